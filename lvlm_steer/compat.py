"""What differs between transformers 5.x releases, in one place, so no other module tests a version.

- The forward's cache argument: ``past_key_values`` until 5.23, ``cache`` from 5.24 (the old name is accepted,
  with a FutureWarning, until 5.40). A forward's kwargs may carry the cache under either name, so code that
  re-feeds them to a nested forward must drop both (otherwise the nested forward writes into generate's live
  cache), and code that passes its own cache must use the name the installed version takes.
- Hub kernels: 5.25 defaults ``from_pretrained(use_kernels=True)``, which raises unless the Hugging Face
  ``kernels`` package is installed; our loaders pass ``use_kernels=False`` wherever the argument exists.
- Attention names: 5.25 sends any ``set_attn_implementation`` name containing "flash" to its flash loader and
  any "a/b" name to the Hub, so our route for a flash base is named without either (``flash_route_name``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import transformers
from packaging.version import Version

# Every name a forward's cache arrives under (newest first), and the per-forward cache bookkeeping that goes with it.
CACHE_ARGUMENTS = ("cache", "past_key_values")
CACHE_STATE_ARGUMENTS = (*CACHE_ARGUMENTS, "use_cache", "cache_position")

TRANSFORMERS_VERSION = Version(transformers.__version__)
CACHE_RENAMED_IN = Version("5.24.0")


def cache_argument(model: Any) -> str:
    """The name under which ``model.forward`` takes its cache on the installed transformers."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    return "cache" if TRANSFORMERS_VERSION.release >= CACHE_RENAMED_IN.release else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass ``cache`` to ``model``'s forward under the name it takes."""
    return {cache_argument(model): cache}


def cache_from(forward_kwargs: Mapping[str, Any]) -> Any | None:
    """The cache a forward was called with, under whichever name it came (None if none)."""
    for name in CACHE_ARGUMENTS:
        if forward_kwargs.get(name) is not None:
            return forward_kwargs[name]
    return None


def without_cache(forward_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A forward's kwargs without its cache (under any name), ``use_cache`` and ``cache_position``.

    For re-feeding an outer forward's inputs to a nested, uncached forward (sink discovery, a paused pass):
    keeping the cache would append the prompt to the outer call's live cache a second time.
    """
    return {k: v for k, v in forward_kwargs.items() if k not in CACHE_STATE_ARGUMENTS}


@functools.cache
def _knows_use_kernels() -> bool:
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "set_use_kernels")


def load_kwargs() -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs for an offline, unpatched load: no Hub kernels (5.25 turns them on by default
    and raises without the ``kernels`` package; they also replace layer forwards with downloaded code)."""
    return {"use_kernels": False} if _knows_use_kernels() else {}


def flash_route_name(base: str) -> str:
    """Our registered name for a flash base (``flash_attention_2`` -> ``lvlmsteer_fa2``): no "flash", no "/".

    transformers >= 5.25 would otherwise look the name up as a flash kernel and fail. The mask function registered
    under this name is the base's, so padding and masks behave as under the base itself.
    """
    suffix = base.removeprefix("flash_attention_") if base.startswith("flash_attention_") else base
    return "lvlmsteer_fa" + "".join(c if c.isalnum() else "_" for c in suffix.replace("flash", ""))


def as_implementation(base: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (transformers' attention function for ``base``) called with ``module.config`` naming ``base``.

    transformers' flash forward chooses its kernel from ``module.config._attn_implementation``, which names our
    route while the model is steered; for the duration of the call the config names the base again.
    """

    @functools.wraps(fn)
    def call(module, *args, **kwargs):
        config = module.config
        routed = config._attn_implementation_internal
        config._attn_implementation_internal = base
        try:
            return fn(module, *args, **kwargs)
        finally:
            config._attn_implementation_internal = routed

    return call
