"""Plain-torch backend: materialises the (Q x K) logits of the given query rows only (callers pass few rows).

Runs on any device. GQA is handled by folding the query heads of one key/value head into the row axis,
(B, H, Q, D) -> (B, Hkv, H // Hkv * Q, D), so k and v are never repeated in memory.
"""

from __future__ import annotations

import torch

from .common import Dims, check_groups, check_mask, check_qkv, default_scaling, mask_bias

NEG_INF = float("-inf")


def masked_logits(
    q: torch.Tensor, k: torch.Tensor, dims: Dims, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Scaled logits (B, H, Q, K) in float32 with the mask applied; hidden keys are exactly -inf."""
    qf = q.float().reshape(dims.B, dims.Hkv, dims.n_rep * dims.Q, dims.D)
    logits = torch.matmul(qf, k.float().transpose(-1, -2)).mul_(scaling)
    logits = logits.view(dims.B, dims.H, dims.Q, dims.K)
    bias = mask_bias(mask)
    return logits if bias is None else logits + bias


def normalised_exp(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(z), logsumexp(z)) over the last axis; an all -inf row gives probabilities 0 and lse -inf (no nan)."""
    lse = torch.logsumexp(z, dim=-1)
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(z - shift[..., None]), lse


def apply_values(p: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """p (B, H, Q, K) @ v (B, Hkv, K, Dv) -> (B, H, Q, Dv) in float32, GQA by row folding."""
    folded = p.reshape(dims.B, dims.Hkv, dims.n_rep * dims.Q, dims.K)
    return torch.matmul(folded, v.float()).view(dims.B, dims.H, dims.Q, dims.Dv)


def grouped_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_groups: torch.Tensor,
    num_groups: int,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group normalised outputs O (G, B, H, Q, Dv) in q.dtype and log-sum-exps L (G, B, H, Q) in float32.

    Same contract as ``lvlm_steer.kernels.grouped_attention``: a group with no visible key in a row has O = 0 and
    L = -inf. Memory is O(Q x K) per group, computed one group at a time.
    """
    dims = check_qkv(q, k, v)
    check_mask(mask, dims, q.device)
    groups = check_groups(key_groups, num_groups, dims, q.device)
    logits = masked_logits(q, k, dims, mask, default_scaling(scaling, dims.D))
    group_of_key = groups[:, :, None, :]  # (B, 1|H, 1, K)
    out = torch.empty((num_groups, dims.B, dims.H, dims.Q, dims.Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_groups, dims.B, dims.H, dims.Q), dtype=torch.float32, device=q.device)
    for g in range(num_groups):
        p, lse[g] = normalised_exp(logits.masked_fill(group_of_key != g, NEG_INF))
        out[g] = apply_values(p, v, dims).to(q.dtype)
    return out, lse


def row_probe(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, scaling: float | None = None
) -> torch.Tensor:
    """Attention probabilities (B, H, Q, K) in float32 for the given query rows only (GQA-aware, O(Q x K) memory).

    Lets a caller look at where a few rows attend (e.g. to find sink keys) without the full attention matrix.
    A row with no visible key gets all-zero probabilities.
    """
    dims = check_qkv(q, k)
    check_mask(mask, dims, q.device)
    return normalised_exp(masked_logits(q, k, dims, mask, default_scaling(scaling, dims.D)))[0]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain materialised softmax attention: (output (B, H, Q, Dv) in q.dtype, probabilities (B, H, Q, K) float32).

    For tests and slow references. Masks follow the kernel contract (bool True = visible; additive entries at or
    below ``common.HIDDEN_BIAS`` are hidden), and a row with no visible key gives output 0 and probabilities 0
    (unlike eager attention, which would spread such a row uniformly over its hidden keys).
    """
    dims = check_qkv(q, k, v)
    check_mask(mask, dims, q.device)
    p = normalised_exp(masked_logits(q, k, dims, mask, default_scaling(scaling, dims.D)))[0]
    return apply_values(p, v, dims).to(q.dtype), p
