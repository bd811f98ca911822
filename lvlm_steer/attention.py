"""The one attention function we register with transformers, and its per-layer dispatch.

transformers looks the attention implementation up by name on every forward
(``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``), so selecting our name for the
text config routes every text layer's attention call through `steered_attention` without touching any
model class. The function looks the calling attention module up in `_ROUTES` (filled by `Steering` at
attach, emptied at removal) and either runs the user's original implementation (sdpa, eager, flash, ...)
or hands the call to the state of the one method that edits this layer. Observers (`lvlm_steer.capture`:
attention capture for any method) see every call first, with the q / k the layer computed, and never change its output.

The mask function must be registered under the same name: without it transformers silently passes
``attention_mask=None`` and padded batches come out wrong.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lvlm_steer.compat import as_implementation, flash_route_name
from lvlm_steer.errors import UnsupportedModelError

if TYPE_CHECKING:
    from lvlm_steer.context import ForwardContext
    from lvlm_steer.method import MethodState

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

_ROUTES: weakref.WeakKeyDictionary[nn.Module, LayerRoute] = weakref.WeakKeyDictionary()


@dataclass
class AttentionCall:
    """One text layer's attention call, as transformers made it (q after RoPE, K/V not GQA-expanded)."""

    module: nn.Module
    query: torch.Tensor  # (B, H, q, D)
    key: torch.Tensor  # (B, H_kv, k, D)
    value: torch.Tensor  # (B, H_kv, k, D)
    attention_mask: torch.Tensor | None
    kwargs: dict[str, Any]
    context: ForwardContext
    base_fn: AttentionFn

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    def base(self) -> torch.Tensor:
        """The unedited (B, q, H, D) output from the user's original implementation."""
        out, _ = self.base_fn(self.module, self.query, self.key, self.value, self.attention_mask, **self.kwargs)
        return out


@dataclass
class LayerRoute:
    """Where one attention module's calls go: the original implementation, or one editing method.

    ``observers`` (callables taking the `AttentionCall`) run first on every unpaused call; they read the call
    and leave its output alone, so they never take the editor's slot.
    """

    base_fn: AttentionFn
    context: ForwardContext
    editors: list[MethodState] = field(default_factory=list)  # per-model states of the editing methods
    steering: Any = None
    observers: list[Callable[[AttentionCall], None]] = field(default_factory=list)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        paused = self.steering is not None and self.steering.paused
        if paused or not (self.editors or self.observers):
            return self.base_fn(module, query, key, value, attention_mask, **kwargs)
        self.context.layer_idx = module.layer_idx
        call = AttentionCall(module, query, key, value, attention_mask, kwargs, self.context, self.base_fn)
        for observer in tuple(self.observers):
            observer(call)
        if not self.editors:
            return self.base_fn(module, query, key, value, attention_mask, **kwargs)
        (editor,) = self.editors  # steer() refuses two attention editors on one layer
        return editor.edit_attention(call), None


def steered_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered attention function: dispatch to the route of ``module``."""
    route = _ROUTES.get(module)
    if route is None:
        # The config still names us but this module is not steered (e.g. a deepcopy of a steered model).
        warnings.warn(
            "lvlm_steer attention called for a module that is not steered; using sdpa. "
            "Call steer() on this model, or set_attn_implementation() back to your choice.",
            stacklevel=2,
        )
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
    return route(module, query, key, value, attention_mask, **kwargs)


def registered_name(base: str) -> str:
    """Our implementation's name for a model whose original implementation is ``base``.

    transformers keys behaviour on substrings of the name: "sdpa" and "flex" trigger capability checks, and from
    5.25 "flash" (or "a/b") sends the name to its kernel loaders, so our names carry none of them. A flash base
    keeps its own mask function under our name (see ``ensure_registered``).
    """
    if base == "sdpa":
        name = "lvlmsteer"
    elif "flash" in base:
        name = flash_route_name(base)  # transformers >= 5.25 refuses custom names containing "flash"
    elif base == "eager":
        name = "lvlmsteer_eager"
    else:
        raise UnsupportedModelError(
            f"attention implementation {base!r} is not supported by lvlm_steer; load the model with "
            "attn_implementation='sdpa' (default), 'eager' or 'flash_attention_2'"
        )
    return name


def base_attention_fn(base: str, module: nn.Module) -> AttentionFn:
    """The function transformers itself would call for ``base`` in ``module``'s model."""
    if base == "eager":
        model_module = sys.modules[type(module).__module__]
        fn = getattr(model_module, "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward to fall back to")
        return fn
    fn = ALL_ATTENTION_FUNCTIONS[base]
    return as_implementation(base, fn) if "flash" in base else fn  # flash picks its kernel by the config's name


def ensure_registered(base: str) -> str:
    """Register our attention function and the base's mask function under our name; return the name."""
    name = registered_name(base)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[base]
    if AttentionInterface._global_mapping.get(name) is not steered_attention:
        AttentionInterface.register(name, steered_attention)
    if AttentionMaskInterface._global_mapping.get(name) is not mask_fn:
        AttentionMaskInterface.register(name, mask_fn)
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys() or name not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        raise RuntimeError(f"registering {name!r} with transformers failed; padded batches would be wrong")
    return name


def add_route(module: nn.Module, route: LayerRoute) -> None:
    if module in _ROUTES:
        raise RuntimeError(f"{type(module).__name__} (layer {module.layer_idx}) is already routed")
    _ROUTES[module] = route


def drop_route(module: nn.Module) -> None:
    _ROUTES.pop(module, None)


def is_routed(module: nn.Module) -> bool:
    return module in _ROUTES


def route_of(module: nn.Module) -> LayerRoute | None:
    """The route of a steered attention module (None when it is not steered)."""
    return _ROUTES.get(module)
