"""The method interface: a config dataclass plus the hooks it attaches.

A method is a small dataclass whose fields are its parameters (with the paper's defaults). It validates
itself against the model in `validate`, says what it edits in `claims` (two methods that claim the same
thing conflict), and attaches its hooks in `attach`, returning the handles so that the `Steering` handle
can remove exactly what was added. Methods never look at architecture details: they ask the adapter and
the per-forward context.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from lvlm_steer.errors import MethodSpecError, closest_first
from lvlm_steer.model_info import ModelInfo

if TYPE_CHECKING:
    import torch

    from lvlm_steer.attention import AttentionCall
    from lvlm_steer.stats import LayerTokens
    from lvlm_steer.steering import Steering


@dataclasses.dataclass
class Method:
    """Base class of every method. Subclasses are dataclasses registered with `register_method`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    # -- lifecycle -------------------------------------------------------------------------------------
    def validate(self, info: ModelInfo) -> None:
        """Raise `MethodConfigError` if a parameter does not fit this model (checked before anything attaches)."""

    def requires_images(self) -> bool:
        """True if every batch row must contain image tokens (checked at each prefill)."""
        return False

    def claims(self, info: ModelInfo) -> set[Hashable]:
        """What this method edits, e.g. ``("head", 14, 3)``; two methods with a common claim conflict."""
        return set()

    def attach(self, steering: Steering) -> list[Any]:
        """Register hooks on the model and return their removable handles."""
        return []

    def reset(self) -> None:
        """Drop per-sequence state; called at the start of every prefill."""

    def prepare(self, steering: Steering, forward_kwargs: dict[str, Any]) -> None:
        """Called at every prefill after `reset`, with the forward's arguments (e.g. to discover model facts once)."""

    def layer_tokens(self, steering: Steering) -> LayerTokens | None:
        """After a prefill: the valid tokens each text layer processed, per row, and the count without this method."""
        return None

    # -- attention edits (used by methods that change attention itself) ---------------------------------
    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        """Text layers whose attention call this method edits."""
        return frozenset()

    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        """Return the (B, q, H, D) attention output for ``call``; ``call.base()`` gives the unedited one."""
        raise NotImplementedError(f"{type(self).__name__} lists attention layers but does not edit attention")

    # -- multi-pass methods ----------------------------------------------------------------------------------
    # True for methods whose `generate` needs the raw PIL images and question texts (``images=``, ``questions=``)
    needs_raw_inputs: ClassVar[bool] = False

    def generate(self, steering: Steering, **inputs: Any) -> Any:
        """Run generation for methods that need extra passes (a pre-pass, capture passes, a contrast branch)."""
        raise NotImplementedError

    @classmethod
    def owns_generation(cls) -> bool:
        return cls.generate is not Method.generate

    # -- description ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-able) with the method name, for result files."""
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Method:
        data = {k: v for k, v in data.items() if k != "method"}
        return cls(**data)

    def spec(self) -> str:
        """The CLI spec that rebuilds this method (``name:key=value,...``)."""
        parts = []
        for f in dataclasses.fields(self):
            fmt = f.metadata.get("format")
            value = getattr(self, f.name)
            if value == f.default:
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
            if f.default is not dataclasses.MISSING:
                default = f.metadata.get("format", str)(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.metadata.get("format", str)(f.default_factory())
            else:
                default = "(required)"
            rows.append((f.name, default, f.metadata.get("help", "")))
        return rows


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _scalar_parser(tp: Any):
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"no parser for parameter type {tp!r}; give the field metadata={{'parse': ...}}")


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
