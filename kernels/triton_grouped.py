"""Triton backend: one pass over K/V with G online-softmax accumulators per query row (see ``_triton_kernel``).

Triton is imported lazily. On CUDA tensors the kernel is compiled; on CPU tensors it runs only under the Triton
interpreter (TRITON_INTERPRET=1 set before the first use in the process), which is how CI tests it.
Softmax, running sums and outputs accumulate in float32; matmul inputs stay in the storage dtype (16-bit
probabilities are rounded to v's dtype before the P @ V product, as in flash attention), and float32 inputs use
exact fp32 ("ieee") dot products.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from .common import HIDDEN_BIAS, Dims, check_groups, check_mask, check_qkv, default_scaling

MAX_GROUPS = 8  # accumulators are a (rows, next_pow2(G), D) tile; more groups would spill registers
MAX_HEAD_DIM = 256


class TritonUnavailableError(RuntimeError):
    """The triton backend was requested but cannot run here."""


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the (CPU) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off", "no")


def _kernel():
    if not triton_installed():
        raise TritonUnavailableError("backend='triton' needs the triton package (pip install triton)")
    from . import _triton_kernel

    return _triton_kernel.grouped_attention_kernel


def unsupported_reason(dims: Dims, num_groups: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these inputs cannot use the triton kernel, or None if they can (CUDA/interpreter is checked separately)."""
    if num_groups > MAX_GROUPS:
        return f"num_groups={num_groups} > {MAX_GROUPS}"
    if max(dims.D, dims.Dv) > MAX_HEAD_DIM:
        return f"head dim {max(dims.D, dims.Dv)} > {MAX_HEAD_DIM}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, n - 1).bit_length())


def _mask_strides(mask: torch.Tensor) -> tuple[int, int, int, int]:
    # broadcast (size-1) axes read index 0 whatever the row is
    return tuple(st if size > 1 else 0 for size, st in zip(mask.shape, mask.stride(), strict=True))


def grouped_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_groups: torch.Tensor,
    num_groups: int,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``lvlm_steer.kernels.grouped_attention``; block sizes are overridable for tests."""
    dims = check_qkv(q, k, v)
    check_mask(mask, dims, q.device)
    groups = check_groups(key_groups, num_groups, dims, q.device)
    reason = unsupported_reason(dims, num_groups, q, k, v)
    if reason:
        raise ValueError(f"backend='triton' cannot take these inputs: {reason}")
    kernel = _kernel()
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if not q.is_cuda and not interpreted:
        raise TritonUnavailableError(
            f"backend='triton' needs CUDA tensors (q is on {q.device}); on CPU it runs only under the Triton "
            "interpreter, with TRITON_INTERPRET=1 set before the kernel is first used in the process"
        )

    out = torch.zeros((num_groups, dims.B, dims.H, dims.Q, dims.Dv), dtype=q.dtype, device=q.device)
    lse = torch.full((num_groups, dims.B, dims.H, dims.Q), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or lse.numel() == 0:
        return out, lse

    g_pad = _pow2(num_groups, lo=1)
    block_d, block_dv = _pow2(dims.D), _pow2(dims.Dv)
    block_n = block_n or 64
    block_m = block_m or (16 if g_pad * block_dv > 256 else 32)
    if mask is None:
        mask_kind, mask_arg, mstrides = 0, q, (0, 0, 0, 0)
    elif mask.dtype == torch.bool:
        mask_kind, mask_arg = 1, mask.view(torch.uint8)
        mstrides = _mask_strides(mask)
    else:
        mask_kind, mask_arg = 2, mask
        mstrides = _mask_strides(mask)
    gstrides = (groups.stride(0), groups.stride(1) if groups.shape[1] > 1 else 0, groups.stride(2))

    rows = dims.n_rep * dims.Q
    grid = (-(-rows // block_m), dims.B * dims.Hkv)
    args = (
        *(q, k, v, groups, mask_arg, out, lse),
        *(*q.stride(), *k.stride(), *v.stride(), *gstrides, *mstrides, *out.stride(), *lse.stride()),
        *(dims.Hkv, dims.n_rep, dims.Q, dims.K, dims.D, dims.Dv),
        *(default_scaling(scaling, dims.D), HIDDEN_BIAS),
    )
    meta = dict(
        G=num_groups,
        G_PAD=g_pad,
        MASK_KIND=mask_kind,
        IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        num_warps=4 if block_m * g_pad * block_dv <= 4096 else 8,
    )
    try:
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            kernel[grid](*args, **meta)
    except Exception as err:
        if "outside of the scope of a kernel" in str(err):  # kernel interpreted but triton.language compiled
            raise TritonUnavailableError(
                "the Triton interpreter needs TRITON_INTERPRET=1 set before triton is first imported in the process"
            ) from err
        raise
    return out, lse
