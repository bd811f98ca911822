"""Attention masks in both of transformers' forms: bool (True = may attend) and additive (0 or a large negative).

Eager attention gets an additive float mask with ``finfo(dtype).min`` at hidden keys (sometimes summed with a
second large negative, so a hidden entry can be below ``min``, or ``-inf``); sdpa may get either form. One
threshold, half of ``finfo.min``, reads both the same way in every dtype.
"""

from __future__ import annotations

import torch


def allowed_keys(mask: torch.Tensor) -> torch.Tensor:
    """A bool copy of ``mask`` with True where attention is allowed (for bool or additive float masks)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool mask: 0 where allowed, ``finfo(dtype).min`` where hidden."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
