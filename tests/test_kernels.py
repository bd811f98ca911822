"""Grouped attention kernels: per-group outputs and log-sum-exps recombine to (edited) materialised attention."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lvlm_steer.kernels import (
    FlashUnavailableError,
    TritonUnavailableError,
    attention_reference,
    combine_groups,
    group_masses,
    grouped_attention,
    row_probe,
    select_backend,
)
from lvlm_steer.kernels.common import visible_keys
from lvlm_steer.kernels.triton_grouped import interpreter_requested, triton_installed

ATOL = 1e-5
MASKS = ("none", "causal", "left_pad", "additive", "per_head_random")
PAD = 5  # left-padded keys of batch row 0


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh generator each run; the seed is printed so a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)


def qkv(gen, B=2, H=4, Hkv=2, Q=3, K=29, D=16, dtype=torch.float32):
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return rand(B, H, Q, D), rand(B, Hkv, K, D), rand(B, Hkv, K, D)


def make_mask(kind: str, gen, B: int, H: int, Q: int, K: int) -> torch.Tensor | None:
    """Masks for the last Q rows of a K-long sequence."""
    if kind == "none":
        return None
    causal = torch.arange(K)[None, :] <= torch.arange(K - Q, K)[:, None]  # (Q, K)
    if kind == "causal":
        return causal[None, None]
    padded = causal[None, None].repeat(B, 1, 1, 1)
    padded[0, :, :, :PAD] = False
    if kind == "left_pad":
        return padded
    if kind == "additive":
        return torch.zeros(padded.shape).masked_fill(~padded, torch.finfo(torch.float32).min)
    if kind == "per_head_random":
        mask = torch.rand(B, H, Q, K, generator=gen) < 0.6
        mask[1, 0, 0] = False  # a row with no visible key at all
        return mask
    raise AssertionError(kind)


def make_groups(kind: str, gen, G: int, B: int, H: int, K: int) -> torch.Tensor:
    """Random groups; for G >= 2 the last group of batch row 0 holds only the last two keys, so under a causal mask
    the first query row sees none of it (an empty group in some rows)."""
    shape = (B, K) if kind == "token" else (B, H, K)
    groups = torch.randint(0, max(G - 1, 1), shape, generator=gen)
    if G >= 2:
        groups[0, ..., -2:] = G - 1
        groups[1, ..., 0] = G - 1
    return groups


def full_groups(groups: torch.Tensor) -> torch.Tensor:
    """(B, 1|H, 1, K) view broadcasting against (B, H, Q, K)."""
    return (groups[:, None] if groups.dim() == 2 else groups)[:, :, None, :]


def visibility(mask, B, H, Q, K) -> torch.Tensor:
    return torch.ones(B, H, Q, K, dtype=torch.bool) if mask is None else visible_keys(mask).expand(B, H, Q, K)


def naive_attention(q, k, v, mask):
    """Independent check of attention_reference: repeat k/v per query head, torch.softmax, hidden rows -> 0."""
    B, H, Q, D = q.shape
    n_rep = H // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    logits = (q @ k.transpose(-1, -2)) * D**-0.5
    logits = logits.masked_fill(~visibility(mask, B, H, Q, k.shape[2]), float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return p @ v, p


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_attention_reference_matches_naive(gen, mask_kind, heads):
    H, Hkv = heads
    q, k, v = qkv(gen, H=H, Hkv=Hkv)
    mask = make_mask(mask_kind, gen, 2, H, 3, 29)
    out, p = attention_reference(q, k, v, mask)
    want_out, want_p = naive_attention(q, k, v, mask)
    torch.testing.assert_close(out, want_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(p, want_p, atol=ATOL, rtol=0)


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("group_kind", ["token", "head"])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_grouped_recombines_to_reference(gen, mask_kind, heads, group_kind, G):
    B, (H, Hkv), Q, K = 2, heads, 3, 29
    q, k, v = qkv(gen, B=B, H=H, Hkv=Hkv, Q=Q, K=K)
    mask = make_mask(mask_kind, gen, B, H, Q, K)
    groups = make_groups(group_kind, gen, G, B, H, K)

    outs, lse = grouped_attention(q, k, v, groups, G, mask=mask)
    assert outs.shape == (G, B, H, Q, 16) and lse.shape == (G, B, H, Q)
    assert outs.dtype == q.dtype and lse.dtype == torch.float32
    want_out, P = attention_reference(q, k, v, mask)
    masses = group_masses(lse)
    torch.testing.assert_close(combine_groups(outs, masses), want_out, atol=ATOL, rtol=0)

    vis = visibility(mask, B, H, Q, K)
    any_visible = vis.any(-1)
    sums = masses.sum(0)
    torch.testing.assert_close(sums[any_visible], torch.ones_like(sums[any_visible]), atol=ATOL, rtol=0)
    assert (sums[~any_visible] == 0).all()
    for g in range(G):
        in_g = full_groups(groups) == g
        torch.testing.assert_close(masses[g], (P * in_g).sum(-1), atol=ATOL, rtol=0)
        empty = ~(vis & in_g).any(-1)  # (B, H, Q)
        assert torch.isneginf(lse[g][empty]).all() and torch.isfinite(lse[g][~empty]).all()
        assert (outs[g][empty] == 0).all()
        assert (masses[g][empty] == 0).all()
    if mask_kind == "causal" and G >= 2:
        assert torch.isneginf(lse[G - 1, 0, :, 0]).all(), "test setup should leave the last group empty in row 0"


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("group_kind", ["token", "head"])
def test_mass_edit_equals_edited_probability_matrix(gen, mask_kind, group_kind):
    """Move 40% of group 1's mass to group 2 (proportionally inside group 2), vs editing P then P @ V."""
    B, H, Hkv, Q, K, G, frac = 2, 8, 2, 3, 29, 4, 0.4
    q, k, v = qkv(gen, B=B, H=H, Hkv=Hkv, Q=Q, K=K)
    mask = make_mask(mask_kind, gen, B, H, Q, K)
    groups = make_groups(group_kind, gen, G, B, H, K)

    outs, lse = grouped_attention(q, k, v, groups, G, mask=mask)
    m = group_masses(lse)
    new = m.clone()
    new[1] = (1 - frac) * m[1]
    new[2] = m[2] + frac * m[1]
    got = combine_groups(outs, new)

    _, P = attention_reference(q, k, v, mask)
    in1, in2 = full_groups(groups) == 1, full_groups(groups) == 2
    m1, m2 = (P * in1).sum(-1, keepdim=True), (P * in2).sum(-1, keepdim=True)
    share = torch.where(m2 > 0, frac * m1 / m2.clamp_min(1e-30), torch.zeros_like(m2))
    P_edit = torch.where(in1, (1 - frac) * P, P)
    P_edit = torch.where(in2, P_edit * (1 + share), P_edit)
    want = P_edit @ v.repeat_interleave(H // Hkv, dim=1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_row_probe_matches_reference(gen, mask_kind, heads):
    H, Hkv = heads
    q, k, v = qkv(gen, H=H, Hkv=Hkv)
    mask = make_mask(mask_kind, gen, 2, H, 3, 29)
    P = row_probe(q, k, mask)
    assert P.shape == (2, H, 3, 29) and P.dtype == torch.float32
    torch.testing.assert_close(P, attention_reference(q, k, v, mask)[1], atol=ATOL, rtol=0)


def test_row_without_visible_keys_gives_zero(gen):
    q, k, v = qkv(gen, B=1, H=2, Hkv=1, Q=2, K=7)
    mask = torch.ones(1, 1, 2, 7, dtype=torch.bool)
    mask[0, 0, 1] = False  # second query row (e.g. a padding row) sees nothing
    groups = torch.randint(0, 3, (1, 7), generator=gen)
    outs, lse = grouped_attention(q, k, v, groups, 3, mask=mask)
    assert (outs[:, :, :, 1] == 0).all() and torch.isneginf(lse[:, :, :, 1]).all()
    masses = group_masses(lse)
    assert (masses[:, :, :, 1] == 0).all() and not masses.isnan().any()
    out = combine_groups(outs, masses)
    assert (out[:, :, 1] == 0).all()
    torch.testing.assert_close(out, attention_reference(q, k, v, mask)[0], atol=ATOL, rtol=0)


def test_single_row_decode_and_custom_scaling(gen):
    q, k, v = qkv(gen, B=2, H=4, Hkv=1, Q=1, K=11, D=8)
    groups = torch.randint(0, 2, (2, 11), generator=gen)
    outs, lse = grouped_attention(q, k, v, groups, 2, scaling=0.3)
    want, _ = attention_reference(q, k, v, scaling=0.3)
    torch.testing.assert_close(combine_groups(outs, group_masses(lse)), want, atol=ATOL, rtol=0)


def test_half_precision_returns_input_dtype(gen):
    q, k, v = qkv(gen, dtype=torch.bfloat16)
    groups = torch.randint(0, 2, (2, 29), generator=gen)
    outs, lse = grouped_attention(q, k, v, groups, 2)
    assert outs.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want, _ = attention_reference(q.float(), k.float(), v.float())
    torch.testing.assert_close(combine_groups(outs, group_masses(lse)).float(), want, atol=2e-2, rtol=0)


def test_auto_on_cpu_is_reference(gen):
    q, k, v = qkv(gen)
    assert select_backend(q, k, v, torch.zeros(2, 29, dtype=torch.long), 1) == "reference"


def test_flash_on_cpu_raises(gen):
    q, k, v = qkv(gen)
    with pytest.raises(FlashUnavailableError, match="CUDA"):
        grouped_attention(q, k, v, torch.zeros(2, 29, dtype=torch.long), 1, backend="flash")


@pytest.mark.skipif(interpreter_requested(), reason="TRITON_INTERPRET is set, so triton can run on CPU here")
def test_triton_on_cpu_without_interpreter_raises(gen):
    q, k, v = qkv(gen)
    with pytest.raises(TritonUnavailableError, match="CUDA|triton package"):
        grouped_attention(q, k, v, torch.zeros(2, 29, dtype=torch.long), 1, backend="triton")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(backend="fast"), ValueError, "backend must be one of"),
        (dict(num_groups=0), ValueError, "num_groups"),
        (dict(key_groups=torch.full((2, 29), 3)), ValueError, r"\[0, 2\)"),
        (dict(key_groups=torch.zeros(2, 28, dtype=torch.long)), ValueError, "key_groups must be"),
        (dict(key_groups=torch.zeros(2, 29)), ValueError, "integer"),
        (dict(mask=torch.ones(2, 1, 3, 28, dtype=torch.bool)), ValueError, "slice the rows"),
        (dict(mask=torch.ones(2, 1, 3, 29, dtype=torch.long)), ValueError, "bool"),
        (dict(k=torch.zeros(2, 3, 29, 16)), ValueError, "multiple"),
    ],
)
def test_bad_inputs_raise_clear_errors(gen, change, error, match):
    q, k, v = qkv(gen)
    kwargs = dict(q=q, k=k, v=v, key_groups=torch.zeros(2, 29, dtype=torch.long), num_groups=2) | change
    if "k" in change:
        kwargs["v"] = change["k"]
    with pytest.raises(error, match=match):
        grouped_attention(**kwargs)


def test_combine_checks_shapes():
    with pytest.raises(ValueError, match="masses"):
        combine_groups(torch.zeros(2, 1, 1, 3, 4), torch.zeros(3, 1, 1, 3))


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported (transformers imports it).
TRITON_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lvlm_steer.kernels import grouped_attention
    from lvlm_steer.kernels.triton_grouped import grouped_attention_triton

    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    B, Q, K, D = 2, 3, 37, 16
    failures = []
    causal = torch.arange(K)[None, :] <= torch.arange(K - Q, K)[:, None]
    for H, Hkv in ((8, 1), (2, 2)):  # 24 folded rows: two row blocks of 16
        padded = causal[None, None].repeat(B, 1, 1, 1)
        padded[0, :, :, :5] = False
        per_head = torch.rand(B, H, Q, K, generator=gen) < 0.6
        per_head[1, 0, 0] = False
        masks = {
            "none": None,
            "causal": causal[None, None],
            "bool_per_head": per_head,
            "additive": torch.zeros(B, 1, Q, K).masked_fill(~padded, torch.finfo(torch.float32).min),
        }
        for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
            q = torch.randn(B, H, Q, D, generator=gen).to(dtype)
            k, v = (torch.randn(B, Hkv, K, D, generator=gen).to(dtype) for _ in range(2))
            for G in (1, 4):
                for shape in ((B, K), (B, H, K)):
                    groups = torch.randint(0, G, shape, generator=gen)
                    groups[0, ..., -2:] = G - 1
                    for name, mask in masks.items():
                        if (dtype == torch.float16 or G == 1) and name != "bool_per_head":
                            continue
                        O, L = grouped_attention_triton(q, k, v, groups, G, mask=mask, block_m=16, block_n=16)
                        O_ref, L_ref = grouped_attention(q.float(), k.float(), v.float(), groups, G, mask=mask)
                        same_inf = torch.equal(torch.isneginf(L), torch.isneginf(L_ref))
                        ok = same_inf and O.dtype == dtype and torch.allclose(O.float(), O_ref, atol=atol, rtol=0)
                        ok = ok and torch.allclose(L.nan_to_num(neginf=0), L_ref.nan_to_num(neginf=0), atol=atol)
                        if not ok:
                            err = (O.float() - O_ref).abs().max().item()
                            failures.append(f"H={H} Hkv={Hkv} {dtype} G={G} groups={shape} mask={name}: {err}")
    print("\\n".join(failures) or "ok")
    sys.exit(1 if failures else 0)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not triton_installed(), reason="triton is not installed (pip install triton)")
def test_triton_interpreter_matches_reference():
    seed = random.SystemRandom().randrange(2**32)
    env = dict(os.environ, TRITON_INTERPRET="1")
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, str(seed)], env=env, capture_output=True, text=True, timeout=600
    )
    print(f"random seed: {seed}; triton interpreter run took {time.perf_counter() - start:.1f}s")
    assert run.returncode == 0, f"seed {seed}\n{run.stdout}\n{run.stderr[-4000:]}"
