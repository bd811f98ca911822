"""flash-attn backend (CUDA only). UNTESTED ON THE DEVELOPMENT MACHINE: it had neither a GPU nor flash_attn.

How it is correct without a mask argument: flash-attn cannot restrict keys per group, so for each group g the keys
that are visible AND in group g are gathered per batch row into a packed varlen sequence (the (B, K, Hkv, D) view of
k/v indexed by a (B, K) selection is exactly flash-attn's varlen layout), and every query row attends, non-causally,
to its batch row's gathered keys. flash-attn then returns the group-normalised output O_g and its softmax_lse = L_g.
A batch row with no selected key gets O_g = 0 and L_g = -inf here (whatever flash-attn writes for it).

This needs visibility to depend only on (batch, key): per-token groups (B, K), and a mask that is None or
key-only (its head and query axes have size 1, or there is a single query row, as in decoding). Additive masks are
used only as visibility, so their visible entries must be exactly 0. Per-head groups or per-row masks (causal
prefill) are refused; ``backend="auto"`` then uses triton or the reference. The selection sizes need a host sync.
Requires flash-attn 2 (flash_attn_varlen_func with return_attn_probs), fp16/bf16, equal q/k/v head dim <= 256.
"""

from __future__ import annotations

import functools
import importlib

import torch

from .common import Dims, check_groups, check_mask, check_qkv, default_scaling, visible_keys


class FlashUnavailableError(RuntimeError):
    """The flash backend was requested but cannot run here."""


@functools.cache
def _varlen_func():
    try:
        return importlib.import_module("flash_attn").flash_attn_varlen_func
    except (ImportError, AttributeError, OSError):
        return None


def flash_installed() -> bool:
    return _varlen_func() is not None


def unsupported_reason(dims: Dims, q: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why the flash path cannot take these (already validated) inputs, or None if it can."""
    if not q.is_cuda:
        return f"it needs CUDA tensors (q is on {q.device})"
    if not flash_installed():
        return "flash_attn (2.x, with flash_attn_varlen_func) is not importable"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16 only, got {q.dtype}"
    if dims.D != dims.Dv or dims.D > 256 or dims.D % 8:
        return f"flash-attn needs equal q/k/v head dims, a multiple of 8 and <= 256 (got {dims.D}, {dims.Dv})"
    if groups.shape[1] != 1:
        return "per-head key groups (B, H, K) are not supported by the flash path"
    if mask is not None and (mask.shape[1] != 1 or (mask.shape[2] != 1 and dims.Q != 1)):
        return "only key-only masks (B|1, 1, 1, K), or any mask with a single query row, are supported"
    return None


def grouped_attention_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_groups: torch.Tensor,
    num_groups: int,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``lvlm_steer.kernels.grouped_attention``, restricted as the module docstring says."""
    dims = check_qkv(q, k, v)
    check_mask(mask, dims, q.device)
    groups = check_groups(key_groups, num_groups, dims, q.device)
    reason = unsupported_reason(dims, q, groups, mask)
    if reason:
        raise FlashUnavailableError(f"backend='flash' cannot run: {reason}")
    B, H, Q, K = dims.B, dims.H, dims.Q, dims.K
    visible = torch.ones((B, K), dtype=torch.bool, device=q.device)
    if mask is not None:
        if mask.dtype != torch.bool:
            seen = visible_keys(mask)
            if bool((mask.float().masked_fill(~seen, 0) != 0).any()):
                raise FlashUnavailableError(
                    "backend='flash' uses masks as visibility only; found a finite non-zero bias"
                )
        visible = visible & visible_keys(mask)[:, 0, 0, :].expand(B, K)

    fn = _varlen_func()
    q_packed = q.transpose(1, 2).reshape(B * Q, H, dims.D)
    cu_q = torch.arange(0, (B + 1) * Q, Q, dtype=torch.int32, device=q.device)
    k_rows, v_rows = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, Hkv, D) views
    out = torch.zeros((num_groups, B, H, Q, dims.Dv), dtype=q.dtype, device=q.device)
    lse = torch.full((num_groups, B, H, Q), float("-inf"), dtype=torch.float32, device=q.device)
    for g in range(num_groups):
        sel = visible & (groups[:, 0, :] == g)
        counts = sel.sum(dim=1)
        max_k = int(counts.max()) if K else 0
        if max_k == 0:
            continue
        cu_k = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        o, l_g, _ = fn(
            q_packed,
            k_rows[sel],
            v_rows[sel],
            cu_q,
            cu_k,
            Q,
            max_k,
            dropout_p=0.0,
            softmax_scale=default_scaling(scaling, dims.D),
            causal=False,
            return_attn_probs=True,
        )
        o = o.view(B, Q, H, dims.Dv).transpose(1, 2)
        l_g = l_g.view(H, B, Q).permute(1, 0, 2) if l_g.dim() == 2 else l_g[..., :Q]  # (H, total_q) or (B, H, Q)
        empty = (counts == 0).view(B, 1, 1)
        out[g] = o.masked_fill(empty[..., None], 0)
        lse[g] = l_g.float().masked_fill(empty, float("-inf"))
    return out, lse
