"""Adapter lookup by the config's ``model_type``."""

from __future__ import annotations

from typing import Any

from torch import nn

from lvlm_steer.errors import UnsupportedModelError, closest_first

_ADAPTERS: dict[str, type] = {}


def register_adapter(cls: type) -> type:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_architectures() -> dict[str, str]:
    """``model_type`` -> display name of every architecture with an adapter."""
    return {t: cls.display_name for t, cls in _ADAPTERS.items()}


def vision_scoring_support() -> str:
    """The model types whose adapter scores vision-tower tokens (pre-LLM pruning), grouped by how: CLS first,
    LLaVA (the pre-LLM pruning papers' model) first within its group."""
    kinds: dict[str, list[str]] = {}
    for model_type, cls in _ADAPTERS.items():
        if cls.vision_scoring_kind:
            kinds.setdefault(cls.vision_scoring_kind, []).append(model_type)
    order = sorted(kinds, key=lambda kind: (kind != "CLS", kind))
    return "; ".join(f"{', '.join(sorted(kinds[k], key=lambda t: (t != 'llava', t)))} ({k})" for k in order)


def adapter_for(model: nn.Module, processor: Any = None):
    """The adapter instance for ``model``; a clear error for anything unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        names = closest_first(str(model_type), _ADAPTERS)
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) has no lvlm_steer adapter. "
            f"Supported model types: {', '.join(names)}. To add one, subclass lvlm_steer.adapters.Adapter "
            "(set model_types, layers_path, vision_path; override image_spans/image_tiles if needed), decorate it "
            "with @lvlm_steer.adapters.register_adapter, and import it before calling steer()."
        )
    return cls(model, processor)
