"""The method interface: settings (a dataclass) apart from the state bound to one model.

A method object holds only its settings: a small dataclass whose fields are its parameters (with the paper's
defaults), validated in ``__post_init__`` and comparable, so ``parse_spec(m.spec()) == m``. It validates
itself against a model in `validate` and says what it edits in `claims` (two methods with a common claim
conflict). Attaching it to a model (`bind`) builds a `MethodState`: the per-model caches, discovered facts and
hooks, dropped by ``remove()``. So one settings object can steer two models at once, or be reused after removal.
A method sees its model through a small `Host` (model facts, the adapter, the per-forward context, pausing,
hook registration), never through the whole `Steering` handle. Methods never look at architecture details:
they ask the adapter and the per-forward context.

Generation. A method that shapes next-token logits returns processors from `MethodState.logits_processors`;
``steered.generate`` chains those of all methods (ordered by `Method.logits_order`, then by the order given
to ``steer()``), after the user's own. At most one method per steering drives the generation loop itself
(`Method.drives_generation`, decided per instance). A method whose work needs ``steered.generate``
(`Method.needs_steered_generate`) makes a plain ``model.generate`` or forward fail with an error naming
``steered.generate(...)``, one way for every method.

Beam search. `Method.supports_beams` says whether the method stays correct when ``generate`` reorders the cache's
rows (beam search). State that depends on each row's own past (e.g. a running mean) follows the reordering in
`MethodState.reorder_beams`; a method that cannot declares ``supports_beams() -> False`` and is refused.

How to port a method written against the old interface (``attach(steering) -> handles`` with its state on
the method object):

1. Keep the dataclass fields and ``__post_init__`` (settings only; no tensors, no per-model caches there).
2. Write ``class _State(MethodState)`` holding what used to live on ``self`` (caches, handles, discovered
   facts) and move ``reset``, ``prepare``, ``edit_attention`` and ``layer_tokens`` onto it; read settings as
   ``self.method.<field>`` and the model through ``self.host`` (``info``, ``adapter``, ``context``,
   ``processor``, ``paused``, ``pause()``, ``model`` for the method's own forwards).
3. Register hooks with ``host.add_forward_pre_hook(module, fn, with_kwargs=...)`` (skipped while paused,
   removed at ``remove()``) or hand other torch handles to ``host.own(handle)``; never return handles.
4. Replace ``attach`` by ``def bind(self, host): return _State(self, host)``.
5. Generation: put a multi-pass loop in ``_State.generate(inputs, logits_processor)`` and return True from
   ``drives_generation()`` (per instance: e.g. only when a contrast stream is on). Put per-step logit edits
   in ``_State.logits_processors(inputs)`` and return True from ``shapes_logits()``; they then compose
   with other methods' instead of owning the loop. Say ``needs_steered_generate()`` only when a plain forward
   would silently skip part of the method (both defaults already say so for the two cases above).
6. Beams: implement ``_State.reorder_beams(beam_idx)`` for per-row state that grows during decoding, or return
   False from ``supports_beams()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from lvlm_steer.errors import MethodConfigError, MethodSpecError, closest_first
from lvlm_steer.model_info import ModelInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lvlm_steer.adapters import Adapter
    from lvlm_steer.attention import AttentionCall
    from lvlm_steer.context import ForwardContext
    from lvlm_steer.stats import LayerTokens
    from lvlm_steer.steering import Steering


class Host(Protocol):
    """What an attached method sees of its steering: model facts, layout, pausing and hook registration."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def adapter(self) -> Adapter: ...

    @property
    def model(self) -> nn.Module:
        """The wrapped model, for the method's own forwards (run them inside `pause` unless they should be edited)."""
        ...

    @property
    def processor(self) -> Any: ...

    @property
    def context(self) -> ForwardContext: ...

    @property
    def paused(self) -> bool: ...

    @property
    def generating(self) -> bool:
        """True while ``steered.generate`` drives the model (plain ``model.generate`` and forwards: False)."""
        ...

    def pause(self, stream_state: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[None]:
        """Run the model unedited inside the block; model state a forward overwrites is restored afterwards."""
        ...

    def add_forward_pre_hook(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """Register ``hook`` on ``module``; it is skipped while paused and removed by ``remove()``."""
        ...

    def own(self, handle: Any) -> None:
        """Record a removable torch handle, so that ``remove()`` takes it off."""
        ...


class MethodState:
    """The per-model side of one attached method: caches, discovered facts, hooks. Dropped by ``remove()``."""

    def __init__(self, method: Method, host: Host) -> None:
        self.method = method
        self.host = host

    def reset(self) -> None:
        """Drop per-sequence state; called at the start of every prefill."""

    def prepare(self, forward_kwargs: dict[str, Any]) -> None:
        """Called at every prefill after `reset`, with the forward's arguments (e.g. to discover model facts once)."""

    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        """Return the (B, q, H, D) attention output for ``call``; ``call.base()`` gives the unedited one."""
        raise NotImplementedError(f"{type(self.method).__name__} lists attention layers but does not edit attention")

    def layer_tokens(self) -> LayerTokens | None:
        """After a prefill: the valid tokens each text layer processed, per row, and the count without this method."""
        return None

    def logits_processors(self, inputs: dict[str, Any]) -> list[Any]:
        """transformers ``LogitsProcessor`` objects for this ``steered.generate`` call (see `Method.shapes_logits`)."""
        return []

    def generate(self, inputs: dict[str, Any], logits_processor: Any) -> Any:
        """Run the generation loop (only for a method whose `Method.drives_generation` is True).

        ``logits_processor`` is the chain of every method's processors (and the user's); pass it to each
        ``model.generate`` that produces the answer."""
        raise NotImplementedError(f"{type(self.method).__name__} drives generation but its state has no generate")

    def reorder_beams(self, beam_idx: torch.Tensor) -> None:
        """Beam search moved cache rows: row ``i`` now continues row ``beam_idx[i]``; reorder per-row state alike."""

    def close(self) -> None:
        """Called once at ``remove()``, after the hooks are off."""


@dataclasses.dataclass
class Method:
    """Base class of every method: its settings. Subclasses are dataclasses registered with `register_method`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # position in the logits chain of `steered.generate` (lower runs first; ties keep the order given to steer())
    logits_order: ClassVar[int] = 0
    # True for methods whose generation needs the raw PIL images and question texts (``images=``, ``questions=``)
    needs_raw_inputs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make every subclass check its float fields for NaN / infinity before its own ``__post_init__``."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_finite", False):

            def __post_init__(self, _own=own) -> None:
                check_finite_fields(self)
                _own(self)

            __post_init__._checks_finite = True  # type: ignore[attr-defined]
            cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        check_finite_fields(self)

    # -- settings checks (before anything attaches) ------------------------------------------------------------
    def validate(self, info: ModelInfo) -> None:
        """Raise `MethodConfigError` if a parameter does not fit this model (checked before anything attaches)."""

    def requires_images(self) -> bool:
        """True if every batch row must contain image tokens (checked at each prefill)."""
        return False

    def claims(self, info: ModelInfo) -> set[Hashable]:
        """What this method edits, e.g. ``("head", 14, 3)``; two methods with a common claim conflict."""
        return set()

    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        """Text layers whose attention call this method's state edits (`MethodState.edit_attention`)."""
        return frozenset()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def bind(self, host: Host) -> MethodState:
        """Attach to one model: register hooks through ``host`` and return the per-model state."""
        raise NotImplementedError(f"{type(self).__name__} defines neither bind(host) nor the old attach(steering)")

    @classmethod
    def is_legacy(cls) -> bool:
        """True for a method still written against the old interface (``attach(steering)``, state on the method)."""
        return cls.bind is Method.bind

    # -- generation ----------------------------------------------------------------------------------------------
    def drives_generation(self) -> bool:
        """True if this instance runs the generation loop itself in ``steered.generate`` (at most one per steering)."""
        return type(self).generate is not Method.generate

    def shapes_logits(self) -> bool:
        """True if this instance adds next-token logits processors (`MethodState.logits_processors`)."""
        return False

    def needs_steered_generate(self) -> bool:
        """True if a plain ``model.generate`` or forward would skip part of this instance (it then raises)."""
        return self.shapes_logits() or (self.drives_generation() and not self.is_legacy())

    def supports_beams(self) -> bool:
        """False if this instance cannot follow beam search's reordering of cache rows (beam search is refused)."""
        return True

    def owns_generation(self) -> bool:
        """Old name of `drives_generation`."""
        return self.drives_generation()

    # -- the old interface (methods not yet ported; see the module docstring) ------------------------------------
    def attach(self, steering: Steering) -> list[Any]:
        """Old interface: register hooks on the model and return their removable handles."""
        return []

    def reset(self) -> None:
        """Old interface: drop per-sequence state; called at the start of every prefill."""

    def prepare(self, steering: Steering, forward_kwargs: dict[str, Any]) -> None:
        """Old interface: called at every prefill after `reset`."""

    def layer_tokens(self, steering: Steering) -> LayerTokens | None:
        """Old interface: the valid tokens each text layer processed at the last prefill."""
        return None

    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        """Old interface: the (B, q, H, D) attention output for ``call``."""
        raise NotImplementedError(f"{type(self).__name__} lists attention layers but does not edit attention")

    def generate(self, steering: Steering, **inputs: Any) -> Any:
        """Old interface: run generation for methods that need extra passes."""
        raise NotImplementedError

    # -- description ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-able) with the method name, for result files."""
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Method:
        hints = typing.get_type_hints(cls)
        data = {k: _tuples_back(hints.get(k), v) for k, v in data.items() if k != "method"}
        return cls(**data)

    def spec(self) -> str:
        """The CLI spec that rebuilds this method (``name:key=value,...``); settings at their default are left out."""
        parts = []
        for f in dataclasses.fields(self):
            fmt = f.metadata.get("format")
            value = getattr(self, f.name)
            if value == _default(f):
                continue
            parts.append(f"{f.name}={fmt(value) if fmt else value}")
        return self.name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def from_params(cls, params: dict[str, str]) -> Method:
        """Build from raw CLI strings, converting each by its field's parser or type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, raw in params.items():
            if key not in fields:
                valid = closest_first(key, fields)
                raise MethodSpecError(
                    f"method {cls.name!r} has no parameter {key!r}; valid parameters: {', '.join(valid)}"
                )
            parse = fields[key].metadata.get("parse") or _scalar_parser(hints[key])
            try:
                kwargs[key] = parse(raw)
            except (TypeError, ValueError) as exc:
                raise MethodSpecError(f"{cls.name}: cannot read {key}={raw!r}: {exc}") from exc
        missing = [f.name for f in fields.values() if f.name not in kwargs and _is_required(f)]
        if missing:
            raise MethodSpecError(f"method {cls.name!r} needs {', '.join(missing)}; e.g. {cls.name}:{missing[0]}=...")
        return cls(**kwargs)

    @classmethod
    def parameters(cls) -> list[tuple[str, str, str]]:
        """(name, default, help) for each parameter, for `lvlm-steer methods`."""
        rows = []
        for f in dataclasses.fields(cls):
            if _is_required(f):
                default = "(required)"
            else:
                default = f.metadata.get("format", str)(_default(f))
            rows.append((f.name, default, f.metadata.get("help", "")))
        return rows


def check_finite_fields(method: Method) -> None:
    """Refuse NaN and infinity in every ``float`` field, naming the field (a NaN passes every range check)."""
    for name in _float_fields(type(method)):
        value = getattr(method, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            raise MethodConfigError(f"{method.name}: {name} must be a finite number, got {value}")


_FLOAT_FIELDS: dict[type, tuple[str, ...]] = {}


def _float_fields(cls: type) -> tuple[str, ...]:
    """Names of the fields typed ``float`` (or a union with float), read once per class."""
    cached = _FLOAT_FIELDS.get(cls)
    if cached is None:
        try:
            hints = typing.get_type_hints(cls)
        except NameError:  # a class defined where its annotations cannot be resolved: read them as text
            hints = {f.name: f.type for f in dataclasses.fields(cls)}
        cached = tuple(f.name for f in dataclasses.fields(cls) if _mentions_float(hints.get(f.name)))
        _FLOAT_FIELDS[cls] = cached
    return cached


def _mentions_float(hint: Any) -> bool:
    if isinstance(hint, str):
        return "float" in hint.replace(" ", "").split("|")
    return hint is float or float in typing.get_args(hint)


def _tuples_back(hint: Any, value: Any) -> Any:
    """JSON turned a tuple field's value into a list: make it a tuple again (``tuple[int, int] | None`` too)."""
    if not isinstance(value, list):
        return value
    kinds = [hint, *typing.get_args(hint)]
    return tuple(value) if any(k is tuple or typing.get_origin(k) is tuple for k in kinds) else value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _scalar_parser(tp: Any):
    if tp is bool:
        return _parse_bool
    if tp is float:
        return parse_finite_float
    if tp in (int, str):
        return tp
    raise TypeError(f"no parser for parameter type {tp!r}; give the field metadata={{'parse': ...}}")


def parse_finite_float(raw: str) -> float:
    """``float(raw)``, refusing nan and inf (spec strings)."""
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
