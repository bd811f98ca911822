"""Sink dimensions that papers publish, and VAR's sink score given a set of dimensions (see `lvlm_steer.sinks`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePath

import torch
from torch import nn

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


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The text decoder layers: the adapter's for a supported VLM, the decoder's (``get_decoder()``) for a text LM."""
    from lvlm_steer.adapters import adapter_for
    from lvlm_steer.errors import UnsupportedModelError

    try:
        return adapter_for(model).layers()
    except UnsupportedModelError:
        return list(model.get_decoder().layers)


def model_ids(model: nn.Module) -> list[str]:
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
    for name in model_ids(model):
        dims = KNOWN_SINK_DIMS.get(name) or by_last.get(_last_component(name))
        if dims is not None:
            break
    if dims is None:
        return None
    hidden = getattr(text_config(model), "hidden_size", None)
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
