"""Checks and reports of sink discovery: the attention share of chosen keys, and a discovery as a table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lvlm_steer.sink_discovery import SinkReport, model_device, to_device, valid_tokens
from lvlm_steer.sink_known import decoder_layers


def _implementations(config: Any) -> dict[str, Any]:
    """The attention implementation of ``config`` and of its sub-configs, in `set_attn_implementation`'s dict form."""
    tree: dict[str, Any] = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            tree[key] = _implementations(sub)
    return tree


@contextmanager
def _eager_attention(model: nn.Module):
    """Temporarily run every attention of ``model`` eagerly; each sub-model's previous choice is restored on exit."""
    saved = _implementations(model.config)
    try:
        model.set_attn_implementation("eager")
        yield
    finally:
        model.set_attn_implementation(saved)


def _attention_weights(model: nn.Module, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    """Per text layer, the (B, heads, Q, K) attention probabilities of one eager forward, read by our own forward
    hooks on the attention modules (eager attention returns its weights as the second output)."""
    layers = decoder_layers(model)
    weights: list[torch.Tensor | None] = [None] * len(layers)

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                weights[index] = output[1]

        return hook

    handles = [layer.self_attn.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
    try:
        with _eager_attention(model), torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not weights or any(w is None for w in weights):
        raise ValueError(f"{type(model).__name__}'s attention modules returned no attention weights under eager")
    return [w for w in weights if w is not None]


def _key_mask(positions: Sequence[int] | torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != tuple(valid.shape):
            raise ValueError(f"positions mask has shape {tuple(positions.shape)}, expected {tuple(valid.shape)}")
        return positions.to(valid.device) & valid
    idx = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions, dtype=torch.long)
    length = valid.shape[1]
    if idx.numel() == 0 or bool(((idx < -length) | (idx >= length)).any()):
        raise ValueError(f"positions {idx.tolist()} empty or out of range for sequence length {length}")
    mask = torch.zeros_like(valid)
    mask[:, idx.to(valid.device) % length] = True
    return mask & valid


def attention_share_of_tokens(
    model: nn.Module,
    inputs: Mapping[str, Any],
    positions: Sequence[int] | torch.Tensor,
    layers: Iterable[int] | None = None,
) -> dict[int, float]:
    """Per decoder layer, the mean fraction of attention that queries give to the keys at ``positions``.

    ``positions``: key positions (the same in every row) or a ``(B, T)`` bool mask. Averaged over heads, rows and the
    valid query positions after the first marked key that are not themselves marked (earlier queries cannot see the
    keys, marked ones would count self-attention). One forward (weights read by our own hooks) under a temporary
    switch to eager attention (restored afterwards, also on error; any custom attention function registered in the
    config is bypassed meanwhile). ``layers`` defaults to every layer.
    """
    inputs = to_device(inputs, model_device(model))
    attentions = _attention_weights(model, inputs)
    batch, _, queries, keys = attentions[0].shape
    valid = valid_tokens(inputs, (batch, keys), attentions[0].device)
    marked = _key_mask(positions, valid)
    pos = torch.arange(keys, device=valid.device)
    first = torch.where(marked, pos, keys).min(dim=1).values  # (B,) first marked key per row
    query_ok = (valid & ~marked & (pos[None, :] > first[:, None]))[:, -queries:]  # (B, Q)
    if not bool(query_ok.any()):
        raise ValueError("no query position comes after the marked keys")
    layers = range(len(attentions)) if layers is None else layers
    shares: dict[int, float] = {}
    for layer in layers:
        attn = attentions[int(layer)].float()  # (B, heads, Q, K)
        mass = (attn * marked[:, None, None, :].to(attn.dtype)).sum(-1).mean(1)  # (B, Q)
        shares[int(layer)] = float(mass[query_ok].mean())
    return shares


def format_sink_report(report: SinkReport, max_tokens: int = 4) -> str:
    """A short human-readable table of ``report``: the chosen dims, then one line per scanned layer."""

    found = [
        f"{d} (peak {r:.0f}x median, {n}/{len(report.layers)} layers)"
        for d, r, n in zip(report.dims, report.ratios, report.layer_counts, strict=True)
    ]
    head = f"sink dims of {report.model or 'model'}: " + (", ".join(found) or "none found")
    rule = (
        f"rule: |x[d]| / median|x| > {report.ratio:g} and >= {report.contrast:g}x typical, "
        f"in >= {report.min_layer_frac:.0%} of layers"
    )
    lines = [head, rule, f"{'layer':>5}  {'typical':>7}  {'sink tokens (row:pos ratio@dim)':<44}  massive dims"]
    for layer in report.per_layer:
        shown = [f"{t.row}:{t.position} {t.ratio:.0f}@{t.dim}" for t in layer.tokens[:max_tokens]]
        if len(layer.tokens) > max_tokens:
            shown.append(f"+{len(layer.tokens) - max_tokens}")
        dims = ", ".join(f"{d}" for d, _ in sorted(layer.dims.items(), key=lambda kv: -kv[1])[:max_tokens])
        lines.append(f"{layer.layer:>5}  {layer.typical_ratio:>7.1f}  {'; '.join(shown) or '-':<44}  {dims or '-'}")
    return "\n".join(lines)
