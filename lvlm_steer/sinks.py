"""Attention-sink tokens from massive activations (VAR, "See What You Are Told", ICLR 2025).

VAR calls key ``j`` a sink in layer ``l`` when ``max_{d in D_sink} |x_j[d] / RMS(x_j)| > tau`` (``tau = 20``), with
``x_j`` the hidden state entering decoder layer ``l`` and ``RMS`` an RMSNorm without weight. ``D_sink`` is a handful of
hidden dimensions that carry the model's "massive activations"; this module

* knows the sets published for a few models (``KNOWN_SINK_DIMS``, ``known_sink_dims``),
* scores and masks sink tokens given a set (``sink_scores``, ``sink_mask``),
* discovers the set for any other model from one forward pass (``find_sink_dims``, cached by ``cached_sink_dims``),
* measures how much attention a set of key positions receives (``attention_share_of_tokens``), to check that the
  discovered tokens really are sinks,
* prints a discovery as a short table (``format_sink_report``).

Discovery, in words. For every token ``j`` and dimension ``d`` of a layer input, ``ratio_j[d] = |x_j[d]| / median_d'
|x_j[d']|``. A token is a *sink token* of the layer when its peak ratio exceeds ``ratio`` and is at least ``contrast``
times the typical (median over the row's tokens) peak ratio. On a sink token, a dimension is *massive* when its ratio
exceeds ``ratio`` and is at least ``contrast`` times that dimension's typical ratio over the row's tokens (a channel
that is large on every token is not a sink channel). ``D_sink`` is the set of dimensions massive in at least
``min_layer_frac`` of the scanned layers, ranked by their peak ratio. Only the hidden states come back from the model,
so any attention implementation works (no eager switch).

Note on ``tau``: ``|x[d]| / RMS(x) <= sqrt(H)`` for a hidden size ``H`` (equality when one dimension holds all the
energy), so ``tau = 20`` is reachable only for ``H > 400`` and is close to the ceiling for small models (SmolLM2-135M,
``H = 576``, peaks at about 23.8).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any

import torch
from torch import nn

from lvlm_steer.compat import without_cache

__all__ = [
    "KNOWN_SINK_DIMS",
    "LayerSinks",
    "SinkReport",
    "SinkToken",
    "attention_share_of_tokens",
    "cached_sink_dims",
    "cached_sink_report",
    "clear_sink_cache",
    "find_sink_dims",
    "format_sink_report",
    "known_sink_dims",
    "sink_mask",
    "sink_scores",
]

# Only the sets that the VAR paper (and the massive-activation papers it builds on) give; keyed by Hub model id.
# Anything else is discovered with `find_sink_dims`. Entries are not measured here: they are the published numbers.
KNOWN_SINK_DIMS: dict[str, tuple[int, ...]] = {
    "llava-hf/llava-1.5-7b-hf": (1415, 2533),
    "llava-hf/llava-1.5-13b-hf": (2100, 4743),
    "Qwen/Qwen2-VL-7B-Instruct": (458, 2570),
    "OpenGVLab/InternVL2-8B": (3584,),
    "OpenGVLab/InternVL2-8B-hf": (3584,),
}

DEFAULT_TAU = 20.0
_EPS = 1e-6


# --------------------------------------------------------------------------------------------------- known sets


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _model_ids(model: nn.Module) -> list[str]:
    config = getattr(model, "config", None)
    ids = [getattr(config, "_name_or_path", None), getattr(model, "name_or_path", None)]
    return [str(i).rstrip("/\\") for i in ids if i]


def _last_component(name: str) -> str:
    return PurePath(name.replace("\\", "/")).name.lower()


def known_sink_dims(model: nn.Module) -> tuple[int, ...] | None:
    """The published ``D_sink`` of ``model``, or ``None`` when the model is not in ``KNOWN_SINK_DIMS``.

    Matches ``model.config._name_or_path`` / ``model.name_or_path`` against the table by full id, then by the id's last
    path component (case-insensitive), so a local folder ``.../llava-1.5-7b-hf`` counts as ``llava-hf/llava-1.5-7b-hf``.
    An entry whose dimensions do not fit the model's text hidden size (a renamed tiny model) is ignored.
    """
    by_last = {_last_component(key): dims for key, dims in KNOWN_SINK_DIMS.items()}
    dims = None
    for name in _model_ids(model):
        dims = KNOWN_SINK_DIMS.get(name) or by_last.get(_last_component(name))
        if dims is not None:
            break
    if dims is None:
        return None
    hidden = getattr(_text_config(model), "hidden_size", None)
    if hidden is not None and max(dims) >= int(hidden):
        return None
    return dims


# --------------------------------------------------------------------------------------------------- VAR scores


def _dims_index(dims: Iterable[int], hidden: int, device: torch.device) -> torch.Tensor:
    dims = [int(d) for d in dims]
    if not dims:
        raise ValueError("sink dims must not be empty")
    bad = [d for d in dims if not -hidden <= d < hidden]
    if bad:
        raise ValueError(f"sink dims {bad} out of range for hidden size {hidden}")
    return torch.tensor(dims, dtype=torch.long, device=device)


def sink_scores(hidden: torch.Tensor, dims: Iterable[int], eps: float = _EPS) -> torch.Tensor:
    """``max_{d in dims} |x[..., d]| / RMS(x)`` in fp32, shape ``hidden.shape[:-1]`` (``(B, L)`` for ``(B, L, H)``).

    ``RMS(x) = sqrt(mean(x ** 2) + eps)`` over the last (hidden) dimension: an RMSNorm without weight.
    """
    x = hidden.float()
    index = _dims_index(dims, x.shape[-1], x.device)
    rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x.index_select(-1, index).abs() / rms).amax(dim=-1)


def sink_mask(hidden: torch.Tensor, dims: Iterable[int], tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Boolean ``hidden.shape[:-1]``: tokens whose ``sink_scores`` exceed ``tau`` (VAR's sink tokens)."""
    return sink_scores(hidden, dims) > tau


# --------------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SinkToken:
    """A sink token of one layer: batch row, position, peak ``|x[d]| / median |x|`` and the dimension reaching it."""

    row: int
    position: int
    ratio: float
    dim: int


@dataclass(frozen=True)
class LayerSinks:
    """Diagnostics of one scanned layer (``layer`` indexes the decoder layer whose input was read)."""

    layer: int
    typical_ratio: float  # median over valid tokens (and rows) of the per-token peak ratio
    tokens: tuple[SinkToken, ...]
    dims: dict[int, float]  # massive dimension on this layer's sink tokens -> its peak ratio there


@dataclass(frozen=True)
class SinkReport:
    """What ``find_sink_dims`` found: ``dims`` (ranked by peak ratio) and how it got there."""

    dims: tuple[int, ...]
    ratios: tuple[float, ...]  # peak ratio of each of `dims` over scanned layers and sink tokens
    layer_counts: tuple[int, ...]  # number of scanned layers in which each of `dims` was massive
    layers: tuple[int, ...]
    per_layer: tuple[LayerSinks, ...]
    candidates: dict[int, int] = field(default_factory=dict)  # every massive dim seen -> layer count (before the cut)
    ratio: float = 20.0
    contrast: float = 4.0
    min_layer_frac: float = 0.5
    model: str | None = None

    def sink_positions(self) -> dict[tuple[int, int], int]:
        """``(row, position) -> number of scanned layers in which that token is a sink``, most frequent first."""
        counts: dict[tuple[int, int], int] = {}
        for layer in self.per_layer:
            for tok in layer.tokens:
                counts[(tok.row, tok.position)] = counts.get((tok.row, tok.position), 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # JSON keys must be strings; keep the dims readable
        data["candidates"] = {str(k): v for k, v in self.candidates.items()}
        for layer in data["per_layer"]:
            layer["dims"] = {str(k): v for k, v in layer["dims"].items()}
        data["sink_positions"] = [[r, p, n] for (r, p), n in self.sink_positions().items()]
        return data

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)


_OWN_KWARGS = ("output_hidden_states", "output_attentions", "return_dict")


def _to_device(inputs: Mapping[str, Any], device: torch.device | None) -> dict[str, Any]:
    """The forward kwargs without the ones these functions set themselves, tensors moved to ``device``."""
    inputs = {k: v for k, v in without_cache(inputs).items() if k not in _OWN_KWARGS}
    if device is None:
        return inputs
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _model_device(model: nn.Module) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return None


def _valid_tokens(inputs: Mapping[str, Any], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == shape:
        return mask.to(device=device).bool()
    return torch.ones(shape, dtype=torch.bool, device=device)


_CAPTURE_HOOK_NAME = "output_capturing_hook"
_CAPTURE_FLAG = "_output_capturing_hooks_installed"
_MISSING = object()


@contextmanager
def _transient_output_capture(model: nn.Module):
    """Remove the output-capturing hooks that transformers installs during the block, if it installs them there.

    transformers (v5) records ``hidden_states`` / ``attentions`` with forward hooks that it adds to the model's layers
    on the first call asking for them and never removes. Left in place they count as hooks on the model, and they
    record a layer's output as it was before any forward hook registered after them changed it. Hooks installed by
    an earlier call elsewhere are left alone (and keep that caveat); only the ones added inside the block go.
    """
    modules = list(model.modules())
    before = [(m, set(m._forward_hooks), m.__dict__.get(_CAPTURE_FLAG, _MISSING)) for m in modules]
    try:
        yield
    finally:
        for module, keys, flag in before:
            for key in [k for k in module._forward_hooks if k not in keys]:
                if getattr(module._forward_hooks[key], "__name__", "") == _CAPTURE_HOOK_NAME:
                    del module._forward_hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_always_called.pop(key, None)
            if flag is _MISSING:
                module.__dict__.pop(_CAPTURE_FLAG, None)
            else:
                module.__dict__[_CAPTURE_FLAG] = flag


def _layer_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """The language model's ``hidden_states`` of one forward: entry ``l`` is the input of decoder layer ``l``.

    Causal LMs and the VLM classes of transformers v5 return the language model's states at the top level
    (``output.hidden_states``, ``num_layers + 1`` entries, the last one after the final norm); vision states, when
    present, come in other fields (``image_hidden_states``). Older composite outputs carried them in
    ``language_model_outputs``; both are handled, and states of the wrong width are refused. The capturing hooks
    transformers adds for this are removed again (``_transient_output_capture``).
    """
    with _transient_output_capture(model), torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    hidden = getattr(_text_config(model), "hidden_size", None)
    candidates = []
    inner = getattr(out, "language_model_outputs", None)
    if inner is not None:
        candidates.append(getattr(inner, "hidden_states", None))
    candidates.append(getattr(out, "hidden_states", None))
    for states in candidates:
        if not states or any(s is None for s in states):
            continue
        if hidden is None or states[0].shape[-1] == int(hidden):
            return tuple(states)
    raise ValueError(
        f"{type(model).__name__} returned no language-model hidden states of width {hidden} "
        "with output_hidden_states=True"
    )


def _default_layers(num_layers: int) -> range:
    """``range(2, L - 1)``: skips the first two and the last layer; shallow models fall back to every layer >= 1."""
    layers = range(2, num_layers - 1)
    if len(layers) == 0:
        layers = range(1, num_layers) if num_layers > 1 else range(num_layers)
    return layers


def _scan_layer(
    x: torch.Tensor, valid: torch.Tensor, layer: int, ratio: float, contrast: float
) -> tuple[LayerSinks, dict[int, float]]:
    """Sink tokens and their massive dims in one layer input ``x`` (B, T, H)."""
    absx = x.float().abs()
    median = absx.median(dim=-1).values.clamp_min(torch.finfo(torch.float32).tiny)
    rel = absx / median[..., None]  # (B, T, H)
    peak, arg = rel.max(dim=-1)  # (B, T)
    tokens: list[SinkToken] = []
    dims: dict[int, float] = {}
    typical_all = []
    for b in range(x.shape[0]):
        rows = valid[b].nonzero().flatten()
        if rows.numel() == 0:
            continue
        typical = peak[b, rows].median()
        typical_dim = rel[b, rows].median(dim=0).values  # (H,)
        typical_all.append(peak[b, rows])
        sinks = rows[(peak[b, rows] > ratio) & (peak[b, rows] >= contrast * typical)]
        for t in sinks.tolist():
            tokens.append(SinkToken(row=b, position=t, ratio=float(peak[b, t]), dim=int(arg[b, t])))
            r = rel[b, t]
            massive = ((r > ratio) & (r >= contrast * typical_dim)).nonzero().flatten().tolist()
            for d in massive:
                dims[d] = max(dims.get(d, 0.0), float(r[d]))
    typical_ratio = float(torch.cat(typical_all).median()) if typical_all else 0.0
    return LayerSinks(layer=layer, typical_ratio=typical_ratio, tokens=tuple(tokens), dims=dims), dims


def find_sink_dims(
    model: nn.Module,
    inputs: Mapping[str, Any],
    layers: Iterable[int] | None = None,
    ratio: float = 20.0,
    top_k: int | None = 4,
    *,
    contrast: float = 4.0,
    min_layer_frac: float = 0.5,
) -> SinkReport:
    """Discover ``D_sink`` of ``model`` from one forward pass on ``inputs`` (see the module docstring for the rule).

    ``inputs`` is what the model's ``forward`` takes (a processor's or tokenizer's output; padded rows are excluded
    through ``attention_mask``); tensors are moved to the model's device. ``layers`` indexes decoder layers whose
    *input* is scanned (default ``range(2, L - 1)``). Returns at most ``top_k`` dims (all with ``None``), possibly
    none when the model has no massive activations on these inputs. Deterministic: no sampling, no dropout is used
    (call it on a model in eval mode).
    """
    if ratio <= 0 or contrast < 1:
        raise ValueError(f"need ratio > 0 and contrast >= 1, got ratio={ratio}, contrast={contrast}")
    if not 0 < min_layer_frac <= 1:
        raise ValueError(f"min_layer_frac must be in (0, 1], got {min_layer_frac}")
    inputs = _to_device(inputs, _model_device(model))
    states = _layer_inputs(model, inputs)
    num_layers = len(states) - 1
    layers = tuple(int(layer) for layer in (_default_layers(num_layers) if layers is None else layers))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {num_layers} decoder layers")
    if not layers:
        raise ValueError("no layers to scan")
    shape = tuple(states[0].shape[:2])
    valid = _valid_tokens(inputs, shape, states[0].device)

    per_layer = []
    counts: dict[int, int] = {}
    peaks: dict[int, float] = {}
    for layer in layers:
        diag, dims = _scan_layer(states[layer], valid.to(states[layer].device), layer, ratio, contrast)
        per_layer.append(diag)
        for d, r in dims.items():
            counts[d] = counts.get(d, 0) + 1
            peaks[d] = max(peaks.get(d, 0.0), r)
    need = min_layer_frac * len(layers)
    kept = sorted((d for d, n in counts.items() if n >= need), key=lambda d: (-peaks[d], d))
    if top_k is not None:
        kept = kept[: max(int(top_k), 0)]
    ids = _model_ids(model)
    return SinkReport(
        dims=tuple(kept),
        ratios=tuple(peaks[d] for d in kept),
        layer_counts=tuple(counts[d] for d in kept),
        layers=layers,
        per_layer=tuple(per_layer),
        candidates=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        ratio=float(ratio),
        contrast=float(contrast),
        min_layer_frac=float(min_layer_frac),
        model=ids[0] if ids else None,
    )


# --------------------------------------------------------------------------------------------------- cache

_REPORTS: weakref.WeakKeyDictionary[nn.Module, SinkReport] = weakref.WeakKeyDictionary()


def cached_sink_dims(
    model: nn.Module, inputs: Mapping[str, Any] | None = None, *, use_known: bool = True, **kwargs: Any
) -> tuple[int, ...]:
    """``D_sink`` for ``model``: the published set when known (and ``use_known``), else discovered once and cached.

    The discovery runs ``find_sink_dims(model, inputs, **kwargs)`` on the first call for a model and is reused for the
    model's lifetime (later ``inputs`` / ``kwargs`` are ignored; ``clear_sink_cache`` forgets it). The cache holds the
    model weakly. ``inputs`` may be ``None`` only for a known model or one already cached.
    """
    if use_known:
        known = known_sink_dims(model)
        if known is not None:
            return known
    report = _REPORTS.get(model)
    if report is None:
        if inputs is None:
            raise ValueError(
                f"{type(model).__name__}: sink dims are not known for this model; pass inputs to find them"
            )
        report = find_sink_dims(model, inputs, **kwargs)
        _REPORTS[model] = report
    return report.dims


def cached_sink_report(model: nn.Module) -> SinkReport | None:
    """The cached discovery of ``model``, if ``cached_sink_dims`` ran one."""
    return _REPORTS.get(model)


def clear_sink_cache(model: nn.Module | None = None) -> None:
    """Forget the cached discovery of ``model`` (of every model with ``None``)."""
    if model is None:
        _REPORTS.clear()
    else:
        _REPORTS.pop(model, None)


# --------------------------------------------------------------------------------------------------- attention check


def _configs(model: nn.Module) -> list:
    """Every config object the model's attention dispatch may read: submodels' configs and nested sub-configs."""
    seen: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        config = todo.pop()
        if config is None or id(config) in seen or not hasattr(config, "_attn_implementation_internal"):
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            todo.append(getattr(config, key, None))
    return list(seen.values())


@contextmanager
def _eager_attention(model: nn.Module):
    """Temporarily run every attention of ``model`` eagerly; each config's previous choice is restored on exit."""
    saved = [(config, config._attn_implementation_internal) for config in _configs(model)]
    try:
        model.set_attn_implementation("eager")
        yield
    finally:
        for config, value in saved:
            config._attn_implementation_internal = value


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
    keys, marked ones would count self-attention). One forward with ``output_attentions=True`` under a temporary
    switch to eager attention (restored afterwards, also on error; any custom attention function registered in the
    config is bypassed meanwhile). ``layers`` defaults to every layer.
    """
    inputs = _to_device(inputs, _model_device(model))
    with _eager_attention(model), _transient_output_capture(model), torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise ValueError(f"{type(model).__name__} returned no attention weights with output_attentions=True")
    batch, _, queries, keys = attentions[0].shape
    valid = _valid_tokens(inputs, (batch, keys), attentions[0].device)
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


# --------------------------------------------------------------------------------------------------- text


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
