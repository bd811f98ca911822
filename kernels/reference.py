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
    row_chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group normalised outputs O (G, B, H, Q, Dv) in q.dtype and log-sum-exps L (G, B, H, Q) in float32.

    Same contract as ``lvlm_steer.kernels.grouped_attention``: a group with no visible key in a row has O = 0 and
    L = -inf. One pass per chunk of query rows: the logits once, one exp against the row maximum, per-group sums
    by a one-hot matmul and per-group weighted values by one folded matmul, so the cost is a small multiple of
    plain attention for those rows (a group whose mass underflows float32 next to the row's largest, below about
    1e-38 of it, is reported as empty). Memory is O(rows x G x K) per chunk of ``row_chunk`` rows.
    """
    dims = check_qkv(q, k, v)
    check_mask(mask, dims, q.device)
    groups = check_groups(key_groups, num_groups, dims, q.device)
    scale = default_scaling(scaling, dims.D)
    onehot = torch.nn.functional.one_hot(groups, num_groups).float()  # (B, 1|H, K, G)
    out = torch.empty((num_groups, dims.B, dims.H, dims.Q, dims.Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_groups, dims.B, dims.H, dims.Q), dtype=torch.float32, device=q.device)
    # few rows (decoding): spread the small weights per group; many rows: build V per group once (G x |V|)
    spread_weights = dims.n_rep * min(dims.Q, row_chunk) * 2 <= dims.Dv
    group_values = None if spread_weights else _values_by_group(v, onehot, dims)
    for start in range(0, dims.Q, row_chunk):
        stop = min(dims.Q, start + row_chunk)
        rows = stop - start
        chunk_mask = mask if mask is None or mask.shape[2] == 1 else mask[:, :, start:stop]
        sub = Dims(dims.B, dims.H, dims.Hkv, rows, dims.K, dims.D, dims.Dv)
        logits = masked_logits(q[:, :, start:stop], k, sub, chunk_mask, scale)
        peak = logits.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        weights = torch.exp(logits - peak)  # hidden keys: exp(-inf) = 0
        if spread_weights:
            spread = weights[..., None, :] * onehot.transpose(-1, -2)[:, :, None]  # (B, H, rows, G, K)
            sums = spread.sum(dim=-1)
            folded = spread.reshape(dims.B, dims.Hkv, dims.n_rep * rows * num_groups, dims.K)
            values = torch.matmul(folded, v.float()).view(dims.B, dims.H, rows, num_groups, dims.Dv)
        else:
            sums = torch.matmul(weights, onehot)  # (B, H, rows, G)
            values = _group_values(weights, group_values, dims, rows, num_groups)  # (B, H, rows, G, Dv)
        normalised = torch.where(sums[..., None] > 0, values / sums.clamp(min=1e-38)[..., None], 0.0)
        out[:, :, :, start:stop] = normalised.permute(3, 0, 1, 2, 4).to(q.dtype)
        lse[:, :, :, start:stop] = (torch.log(sums) + peak).permute(3, 0, 1, 2)
    return out, lse


def _values_by_group(v: torch.Tensor, onehot: torch.Tensor, dims: Dims) -> torch.Tensor:
    """V with the keys of other groups zeroed, per group: (B, Hkv|H, G, K, Dv), G x the size of V at most."""
    vf = v.float()
    if onehot.shape[1] != 1:  # per-head groups: each query head needs its own copy
        vf = vf.repeat_interleave(dims.n_rep, dim=1)
    return vf[:, :, None] * onehot.permute(0, 1, 3, 2)[..., None]


def _group_values(weights: torch.Tensor, group_values: torch.Tensor, dims: Dims, rows: int, groups: int):
    """sum_{j in g} weights_j v_j for every group: one batched matmul, (B, H, rows, G, Dv)."""
    if group_values.shape[1] == dims.H and dims.n_rep != 1:  # per-head groups
        values = torch.matmul(weights[:, :, None], group_values)  # (B, H, G, rows, Dv)
        return values.permute(0, 1, 3, 2, 4)
    folded = weights.reshape(dims.B, dims.Hkv, 1, dims.n_rep * rows, dims.K)
    values = torch.matmul(folded, group_values)  # (B, Hkv, G, n_rep * rows, Dv)
    return (
        values.view(dims.B, dims.Hkv, groups, dims.n_rep, rows, dims.Dv)
        .permute(0, 1, 3, 4, 2, 5)
        .reshape(dims.B, dims.H, rows, groups, dims.Dv)
    )


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
