"""Discovery of a model's sink dimensions from one forward pass, and its per-model cache (see `lvlm_steer.sinks`)."""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lvlm_steer.compat import without_cache
from lvlm_steer.sink_known import decoder_layers, known_sink_dims, model_ids


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


def to_device(inputs: Mapping[str, Any], device: torch.device | None) -> dict[str, Any]:
    """The forward kwargs without the ones these functions set themselves, tensors moved to ``device``."""
    inputs = {k: v for k, v in without_cache(inputs).items() if k not in _OWN_KWARGS}
    if device is None:
        return inputs
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def model_device(model: nn.Module) -> torch.device | None:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return None


def valid_tokens(inputs: Mapping[str, Any], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == shape:
        return mask.to(device=device).bool()
    return torch.ones(shape, dtype=torch.bool, device=device)


def _layer_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """The hidden states entering each text decoder layer in one forward (entry ``l``: the input of layer ``l``).

    Recorded by our own forward pre-hooks on the decoder layers (removed before returning), so no
    ``output_hidden_states`` and none of the capturing hooks transformers would leave on the model.
    """
    layers = decoder_layers(model)
    states: list[torch.Tensor | None] = [None] * len(layers)

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            states[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not states or any(s is None for s in states):
        raise ValueError(f"{type(model).__name__}: the forward did not run every text decoder layer")
    return tuple(s for s in states if s is not None)


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
    inputs = to_device(inputs, model_device(model))
    states = _layer_inputs(model, inputs)
    num_layers = len(states)
    layers = tuple(int(layer) for layer in (_default_layers(num_layers) if layers is None else layers))
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {num_layers} decoder layers")
    if not layers:
        raise ValueError("no layers to scan")
    shape = tuple(states[0].shape[:2])
    valid = valid_tokens(inputs, shape, states[0].device)

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
    ids = model_ids(model)
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
