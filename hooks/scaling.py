"""Per-head gain on the outputs before ``o_proj`` (the primitive behind head reinforcement methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lvlm_steer.errors import MethodConfigError
from lvlm_steer.heads import add_head_output_hook, query_rows, validate_heads, validate_where
from lvlm_steer.method import Host, Method, MethodState
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method

GainMap = dict[int, dict[int, float]]


def normalize_gains(value, default_gain: float = 1.0) -> GainMap:
    """``{20: {1: 2.0}}``, ``{20: [1, 3]}`` (at ``default_gain``) or ``"20.1@2,20.3"`` -> ``{layer: {head: gain}}``."""
    if isinstance(value, str):
        value = parse_gains(value)
    out: GainMap = {}
    for layer, heads in dict(value).items():
        if isinstance(heads, dict):
            gains = {int(h): float(default_gain if g is None else g) for h, g in heads.items()}
        else:
            heads = [heads] if isinstance(heads, (int, str)) else heads
            gains = {int(h): float(default_gain) for h in heads}
        out[int(layer)] = dict(sorted(gains.items()))
    return dict(sorted(out.items()))


def parse_gains(text: str) -> dict[int, dict[int, float | None]]:
    """``"20.1@2.0,20.3"``: layer.head, optionally ``@gain`` (None: the method's ``gain`` applies)."""
    out: dict[int, dict[int, float | None]] = {}
    for piece in text.replace(" ", "").split(","):
        if not piece:
            continue
        head, _, gain = piece.partition("@")
        layer, dot, h = head.partition(".")
        if not dot:
            raise ValueError(f"expected layer.head[@gain] such as 20.1@2.0, got {piece!r}")
        out.setdefault(int(layer), {})[int(h)] = float(gain) if gain else None
    if not out:
        raise ValueError("empty head list; write layer.head[@gain] such as 20.1@2.0")
    return out


def format_gains(gains: GainMap) -> str:
    return ",".join(f"{layer}.{h}@{g:g}" for layer, hs in sorted(gains.items()) for h, g in hs.items())


@register_method
@dataclass
class ScaleHeads(Method):
    """Multiply chosen heads' outputs by a gain before ``o_proj`` (1.0 leaves the model unchanged)."""

    name: ClassVar[str] = "scale"
    summary: ClassVar[str] = "multiply heads' outputs before o_proj by a per-head gain"
    paper: ClassVar[str] = "per-head output scaling (as used by head-reinforcement methods such as VHR)"

    heads: GainMap = field(
        metadata={"parse": parse_gains, "format": format_gains, "help": "layer.head[@gain] list, e.g. 20.1@2,20.3"},
    )
    gain: float = field(default=2.0, metadata={"help": "gain for heads listed without @gain"})
    where: str = field(default="all", metadata={"help": "query tokens to edit: all | image | text"})

    def __post_init__(self) -> None:
        self.heads = normalize_gains(self.heads, self.gain)
        validate_where(self.where, self.name)
        for layer, hs in self.heads.items():
            for h, g in hs.items():
                if not torch.isfinite(torch.tensor(g)):
                    raise MethodConfigError(f"scale: gain of head {layer}.{h} must be finite, got {g}")

    def validate(self, info: ModelInfo) -> None:
        validate_heads({layer: tuple(hs) for layer, hs in self.heads.items()}, info, self.name)

    def requires_images(self) -> bool:
        return self.where == "image"

    def claims(self, info: ModelInfo) -> set:
        return {("head", layer, h) for layer, hs in self.heads.items() for h in hs}

    def bind(self, host: Host) -> MethodState:
        for layer, hs in self.heads.items():
            gains = torch.ones(host.info.num_heads)
            for h, g in hs.items():
                gains[h] = g
            add_head_output_hook(host, layer, self._editor(host, gains))
        return MethodState(self, host)  # stateless: the gains are settings

    def _editor(self, host: Host, gains: torch.Tensor):
        def edit(x: torch.Tensor) -> torch.Tensor:
            scaled = x * gains.to(x.device, x.dtype)[:, None]
            rows = query_rows(host, self.where, x.device)
            return scaled if rows is None else torch.where(rows, scaled, x)

        return edit
