"""``grouped_attention``: validation once, then the backend ("auto" | "reference" | "triton" | "flash")."""

from __future__ import annotations

import torch

from . import flash, triton_grouped
from .common import check_groups, check_mask, check_qkv
from .reference import grouped_attention_reference

BACKENDS = ("auto", "reference", "triton", "flash")

_IMPLS = {
    "reference": grouped_attention_reference,
    "triton": triton_grouped.grouped_attention_triton,
    "flash": flash.grouped_attention_flash,
}


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_groups: torch.Tensor,
    num_groups: int,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> str:
    """The backend that would run. "auto": flash on CUDA when flash_attn imports and supports the inputs, else
    triton on CUDA when installed and supported, else the reference. An explicit backend that cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dims = check_qkv(q, k, v)
    check_mask(mask, dims, q.device)
    groups = check_groups(key_groups, num_groups, dims, q.device)
    flash_reason = flash.unsupported_reason(dims, q, groups, mask)
    triton_reason = triton_grouped.unsupported_reason(dims, num_groups, q, k, v)
    if backend == "flash" and flash_reason:
        raise flash.FlashUnavailableError(f"backend='flash' cannot run: {flash_reason}")
    if backend == "triton":
        if not triton_grouped.triton_installed():
            raise triton_grouped.TritonUnavailableError(
                "backend='triton' needs the triton package (pip install triton)"
            )
        if triton_reason:
            raise ValueError(f"backend='triton' cannot take these inputs: {triton_reason}")
    if backend != "auto":
        return backend
    if flash_reason is None:
        return "flash"
    if q.is_cuda and triton_grouped.triton_installed() and triton_reason is None:
        return "triton"
    return "reference"


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_groups: torch.Tensor,
    num_groups: int,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the given query rows, split by key group: (O (G, B, H, Q, Dv), L (G, B, H, Q)).

    q: (B, H, Q, D), only the rows to edit. k, v: (B, Hkv, K, D|Dv) with H % Hkv == 0 (GQA: query head h reads
    key/value head h // (H // Hkv); k/v are never repeated in memory). key_groups: integer (B, K), or (B, H, K) for
    per-head groups, values in [0, num_groups) (checked on CPU only). mask: None (all keys visible), bool
    (B|1, H|1, Q|1, K) with True = may attend, or additive float of that shape where entries at or below
    ``common.HIDDEN_BIAS`` (-32752; finfo(dtype).min or -inf masks) hide the key and other entries are added to the
    logits. The caller slices a whole-forward mask down to the rows it passes. scaling: default D ** -0.5.

    O[g] = sum_{j in g, visible} softmax_g(z)_j v_j is the group-normalised output (q.dtype; 0 where the group has no
    visible key) and L[g] = logsumexp_{j in g, visible} z_j (float32; -inf where the group has no visible key), with z
    the scaled masked logits, computed in float32. Full attention is ``combine_groups(O, group_masses(L))``; any edit
    of the group masses alone is ``combine_groups(O, new_masses)``. A row with no visible key has O = 0 and L = -inf
    in every group, and combines to 0.
    """
    name = select_backend(q, k, v, key_groups, num_groups, mask, backend)
    return _IMPLS[name](q, k, v, key_groups, num_groups, mask=mask, scaling=scaling)
