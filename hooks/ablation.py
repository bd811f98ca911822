"""Head ablation: replace chosen heads' outputs before ``o_proj`` with zero, their mean, or a constant.

Mean ablation uses the causal running mean of the head's output over the row's (non-padding, selected)
positions up to and including the current one. A mean over the whole sequence would change earlier
positions once later tokens arrive, which no KV cache can reproduce; the causal mean gives the same result
cached and uncached, and per row regardless of left padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lvlm_steer.errors import MethodConfigError
from lvlm_steer.heads import (
    HeadMap,
    add_head_output_hook,
    format_heads,
    normalize_heads,
    parse_heads,
    query_rows,
    validate_heads,
    validate_where,
)
from lvlm_steer.method import Host, Method, MethodState
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method

MODES = ("zero", "mean", "constant")


@register_method
@dataclass
class AblateHeads(Method):
    """Knock out attention heads (per layer.head) on the per-head outputs, for every attention backend."""

    name: ClassVar[str] = "ablate"
    summary: ClassVar[str] = "replace heads' outputs before o_proj with zero, their causal mean, or a constant"
    paper: ClassVar[str] = "standard head ablation (zero / mean ablation)"

    heads: HeadMap = field(
        metadata={"parse": parse_heads, "format": format_heads, "help": "layer.head list, e.g. 14.3,14.5"},
    )
    mode: str = field(default="zero", metadata={"help": "zero | mean (causal, over positions) | constant"})
    value: float = field(default=0.0, metadata={"help": "the constant for mode=constant"})
    where: str = field(default="all", metadata={"help": "query tokens to edit: all | image | text"})

    def __post_init__(self) -> None:
        self.heads = normalize_heads(self.heads)
        if self.mode not in MODES:
            raise MethodConfigError(f"ablate: mode={self.mode!r} is not one of {', '.join(MODES)}")
        validate_where(self.where, self.name)

    def validate(self, info: ModelInfo) -> None:
        validate_heads(self.heads, info, self.name)

    def requires_images(self) -> bool:
        return self.where == "image"

    def claims(self, info: ModelInfo) -> set:
        return {("head", layer, h) for layer, hs in self.heads.items() for h in hs}

    def bind(self, host: Host) -> MethodState:
        return (_MeanAblation if self.mode == "mean" else _Ablation)(self, host)


class _Ablation(MethodState):
    """The head hooks of one model; mean mode adds the running sums of each row."""

    method: AblateHeads

    def __init__(self, method: AblateHeads, host: Host) -> None:
        super().__init__(method, host)
        for layer, hs in method.heads.items():
            add_head_output_hook(host, layer, self._editor(layer, list(hs)))

    def _editor(self, layer: int, heads: list[int]):
        method = self.method

        def edit(x: torch.Tensor) -> torch.Tensor:
            rows = query_rows(self.host, method.where, x.device)
            old = x[:, :, heads]
            new = self._replacement(layer, old, rows)
            if rows is not None:
                new = torch.where(rows, new, old)
            out = x.clone()
            out[:, :, heads] = new
            return out

        return edit

    def _replacement(self, layer: int, old: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """What the heads' outputs become: zero or the constant (mean mode overrides)."""
        if self.method.mode == "zero":
            return torch.zeros_like(old)
        return torch.full_like(old, self.method.value)


class _MeanAblation(_Ablation):
    """Causal running mean per row: the sums and counts so far, carried across cached decoding steps."""

    def __init__(self, method: AblateHeads, host: Host) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}
        super().__init__(method, host)

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def reorder_beams(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i continues row beam_idx[i], so it takes that row's sums and counts."""
        for store in (self.sums, self.counts):
            for layer, value in store.items():
                store[layer] = value.index_select(0, beam_idx.to(value.device))

    def _replacement(self, layer: int, old: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        weight = self.host.context.query_valid_mask().to(old.device)[:, :, None, None]
        if rows is not None:
            weight = weight & rows
        weight = weight.to(old.dtype)
        sums = torch.cumsum(old * weight, dim=1)
        counts = torch.cumsum(weight, dim=1)
        if layer in self.sums:
            sums = sums + self.sums[layer][:, None]
            counts = counts + self.counts[layer][:, None]
        self.sums[layer], self.counts[layer] = sums[:, -1], counts[:, -1]
        return sums / counts.clamp(min=1)
