"""From per-group results to attention outputs: group masses and their recombination.

With O_g the group-normalised output and L_g the group log-sum-exp, full attention is sum_g m_g O_g with
m_g = softmax_g(L)_g. Any edit that only moves mass between groups (keeping proportions inside each group) is
sum_g m'_g O_g for the edited masses m', so the (Q x K) probability matrix is never needed.
"""

from __future__ import annotations

import torch


def group_masses(lse: torch.Tensor) -> torch.Tensor:
    """Attention mass per group, (G, B, H, Q) float32: a softmax of L over the group axis (axis 0).

    Empty groups (L = -inf) get 0; a row where every group is empty (no visible key at all) gets 0 everywhere,
    so its masses sum to 0 rather than 1.
    """
    if lse.dim() < 1 or lse.shape[0] < 1:
        raise ValueError(f"lse must be (G, ...) with G >= 1, got shape {tuple(lse.shape)}")
    lse = lse.float()
    top = lse.amax(dim=0, keepdim=True)
    e = torch.exp(lse - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    total = e.sum(dim=0, keepdim=True)
    return torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(e))


def combine_groups(out: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """sum_g masses[g] * out[g]: out (G, B, H, Q, D), masses (G, B, H, Q) (or broadcastable) -> (B, H, Q, D).

    Computed in float32 and returned in out.dtype. Masses need not sum to 1 (an edit may drop mass on purpose).
    """
    if out.dim() != 5:
        raise ValueError(f"out must be (G, B, H, Q, D), got shape {tuple(out.shape)}")
    if masses.dim() != 4 or masses.shape[0] != out.shape[0]:
        raise ValueError(f"masses must be (G, B, H, Q) with G = {out.shape[0]}, got shape {tuple(masses.shape)}")
    try:
        fits = torch.broadcast_shapes(masses.shape, out.shape[:-1]) == out.shape[:-1]
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"masses {tuple(masses.shape)} do not broadcast to {tuple(out.shape[:-1])}")
    return (masses.float()[..., None] * out.float()).sum(dim=0).to(out.dtype)
