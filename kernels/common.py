"""Input checks and mask/group normalisation shared by every backend, so all backends agree on the edge cases."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# An additive mask entry at or below this counts as a hidden key. It is half of float16's most negative value, so
# masks built with torch.finfo(dtype).min of any of fp16 / bf16 / fp32 (and -inf) are hidden whatever dtype they were
# cast to since. exp(bias) is exactly 0 in float32 for such a bias, so treating it as hidden only changes groups or
# rows whose every key has such a bias: they become empty (O = 0, L = -inf) instead of a softmax over hidden keys.
HIDDEN_BIAS = torch.finfo(torch.float16).min / 2


@dataclass(frozen=True)
class Dims:
    """Sizes of one call: batch, query heads, key/value heads, query rows, keys, q/k head dim, v head dim."""

    B: int
    H: int
    Hkv: int
    Q: int
    K: int
    D: int
    Dv: int

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA); query head h reads key/value head h // n_rep."""
        return self.H // self.Hkv


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> Dims:
    """Validate q (B, H, Q, D), k (B, Hkv, K, D), v (B, Hkv, K, Dv) and return their sizes."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (B, H, Q, D) / (B, Hkv, K, D); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    B, H, Q, D = q.shape
    Bk, Hkv, K, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    Dv = D
    if v is not None:
        if v.dim() != 4 or tuple(v.shape[:3]) != (B, Hkv, K):
            raise ValueError(f"v must be (B, Hkv, K, Dv) = ({B}, {Hkv}, {K}, Dv); got {tuple(v.shape)}")
        Dv = v.shape[-1]
    for name, t in (("k", k), ("v", v)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not q.is_floating_point() or not k.is_floating_point() or (v is not None and not v.is_floating_point()):
        raise ValueError("q, k and v must be floating point")
    return Dims(B, H, Hkv, Q, K, D, Dv)


def check_mask(mask: torch.Tensor | None, dims: Dims, device: torch.device) -> None:
    """A mask is bool (True = may attend) or additive float, shaped (B|1, H|1, Q|1, K); the caller slices rows."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool (True = may attend) or an additive float mask, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}")
    ok = (
        mask.dim() == 4
        and mask.shape[0] in (1, dims.B)
        and mask.shape[1] in (1, dims.H)
        and mask.shape[2] in (1, dims.Q)
        and mask.shape[3] == dims.K
    )
    if not ok:
        raise ValueError(
            f"mask must be shaped (B|1, H|1, Q|1, K) = ({dims.B}|1, {dims.H}|1, {dims.Q}|1, {dims.K}); got "
            f"{tuple(mask.shape)} (slice the rows of a whole-forward mask to the query rows you pass)"
        )


def check_groups(key_groups: torch.Tensor, num_groups: int, dims: Dims, device: torch.device) -> torch.Tensor:
    """Return key_groups as int64 (B, 1|H, K). Value range is checked on CPU only (on CUDA it would force a sync)."""
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not isinstance(key_groups, torch.Tensor):
        raise TypeError(f"key_groups must be an integer tensor, got {type(key_groups).__name__}")
    if key_groups.dtype == torch.bool or key_groups.is_floating_point() or key_groups.is_complex():
        raise ValueError(f"key_groups must be an integer tensor (int64), got {key_groups.dtype}")
    if key_groups.device != device:
        raise ValueError(f"key_groups is on {key_groups.device} but q is on {device}")
    if key_groups.dim() == 2 and tuple(key_groups.shape) == (dims.B, dims.K):
        groups = key_groups[:, None, :]
    elif key_groups.dim() == 3 and tuple(key_groups.shape) == (dims.B, dims.H, dims.K):
        groups = key_groups
    else:
        raise ValueError(
            f"key_groups must be (B, K) = ({dims.B}, {dims.K}) or (B, H, K) = ({dims.B}, {dims.H}, {dims.K}); "
            f"got {tuple(key_groups.shape)}"
        )
    groups = groups.long()
    if groups.device.type == "cpu" and groups.numel():
        lo, hi = int(groups.min()), int(groups.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"key_groups values must lie in [0, {num_groups}); found [{lo}, {hi}]")
    return groups


def default_scaling(scaling: float | None, head_dim: int) -> float:
    """Softmax scale: head_dim ** -0.5 unless given."""
    return float(head_dim) ** -0.5 if scaling is None else float(scaling)


def mask_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as a float32 additive bias: 0 (or the given finite bias) where visible, exactly -inf where hidden."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    bias = mask.float()
    return bias.masked_fill(bias <= HIDDEN_BIAS, float("-inf"))


def visible_keys(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of a mask: True where the key may be attended."""
    return mask if mask.dtype == torch.bool else mask > HIDDEN_BIAS
