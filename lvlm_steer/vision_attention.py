"""Row probes of a vision tower's self-attention: what pre-LLM reducers score tokens by.

Only the needed query rows are computed (``q_rows . k^T`` from the attention module's own projections and the
inputs it receives, split into heads by the adapter's ``VisionScoring.project``), never the tower's full
attention output. Two scores, both head-means over the tower's positions:
- `cls_row_scores`: the attention of the CLS query (position 0) to every position (VTC-CLS, VisionZip, DAMRO);
- `received_scores`: for towers without a CLS token (SigLIP), the mean attention each position receives from all
  valid queries, in bounded blocks of query rows (`PROBE_ELEMENTS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lvlm_steer.adapters.base import head_projections

PROBE_ELEMENTS = 1 << 23  # cap on (units x heads x query rows x keys) probabilities held at once (no-CLS towers)

Project = Callable[[nn.Module, torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
    if mask is None:
        return logits
    m = mask[:, :, rows] if mask.shape[2] > 1 else mask
    if m.dtype == torch.bool:
        return logits.masked_fill(~m, float("-inf"))
    return logits + m.float()


def cls_row_scores(
    module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, project: Project = head_projections
) -> torch.Tensor:
    """Attention of the CLS query (position 0) to every position, averaged over heads: (B, N)."""
    q, k = project(module, hidden, slice(0, 1))
    logits = _apply_mask(q @ k.transpose(-1, -2) * module.scale, mask, slice(0, 1))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def received_scores(
    module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, project: Project = head_projections
) -> torch.Tensor:
    """Mean attention each position receives from the valid queries, averaged over heads: (B, N).

    For towers without a CLS token. Queries are processed in blocks so the (q x k) probabilities of the
    whole tower are never held at once.
    """
    b, n, _ = hidden.shape
    valid = _valid_keys(mask, b, n, hidden.device)
    total = torch.zeros(b, n, device=hidden.device)
    chunk = max(1, PROBE_ELEMENTS // (b * module.num_heads * n))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        q, k = project(module, hidden, rows)
        probs = _apply_mask(q @ k.transpose(-1, -2) * module.scale, mask, rows).softmax(dim=-1)
        weight = valid[:, None, rows, None].float()  # padded patches ask nothing
        total += (probs * weight).sum(dim=2).mean(dim=1)
    return total / valid.sum(dim=1, keepdim=True).clamp(min=1)


def _valid_keys(mask: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, N) True at positions some query may attend to (real patches)."""
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    m = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    return m.any(dim=1).expand(b, n)
