"""Prefill token counts and FLOPs per text layer, with and without token pruning.

FLOPs follow FastV's Eq. 5 (multiply-add counted once, per decoder layer, prefill over ``n`` tokens):
``C(n) = 4 n d^2 + 2 n^2 d + 2 n d m`` (Q/K/V/O projections, QK^T and AV, two FFN matrices). It ignores
GQA's smaller K/V projections and SwiGLU's third FFN matrix on purpose, so numbers compare with the papers.
Counts use the valid (non-pad) tokens of each batch row, each row costed on its own and summed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def prefill_flops(n: int, d: int, m: int) -> int:
    """FastV Eq. 5: FLOPs of one decoder layer over ``n`` tokens (hidden ``d``, FFN size ``m``)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass
class LayerTokens:
    """What a pruning method reports after a prefill."""

    unpruned: list[int]  # per batch row, valid tokens the LLM would process without pruning
    per_layer: list[list[int]]  # [layer][row] valid tokens entering each text layer


@dataclass
class PrefillStats:
    """Tokens and FLOPs of each text layer at the last prefill, and the same without pruning."""

    hidden_size: int
    intermediate_size: int
    unpruned: list[int]  # per row
    per_layer: list[list[int]]  # [layer][row]
    flops_per_layer: list[int] = field(init=False)  # summed over rows
    flops_per_layer_unpruned: list[int] = field(init=False)

    def __post_init__(self) -> None:
        d, m = self.hidden_size, self.intermediate_size
        base = sum(prefill_flops(n, d, m) for n in self.unpruned)
        self.flops_per_layer = [sum(prefill_flops(n, d, m) for n in rows) for rows in self.per_layer]
        self.flops_per_layer_unpruned = [base] * len(self.per_layer)

    @classmethod
    def from_layer_tokens(cls, tokens: LayerTokens, hidden_size: int, intermediate_size: int) -> PrefillStats:
        return cls(hidden_size, intermediate_size, list(tokens.unpruned), [list(r) for r in tokens.per_layer])

    @property
    def num_layers(self) -> int:
        return len(self.per_layer)

    @property
    def batch_size(self) -> int:
        return len(self.unpruned)

    @property
    def tokens_per_layer(self) -> list[int]:
        """Valid tokens entering each layer, summed over rows."""
        return [sum(rows) for rows in self.per_layer]

    @property
    def total_flops(self) -> int:
        return sum(self.flops_per_layer)

    @property
    def total_flops_unpruned(self) -> int:
        return sum(self.flops_per_layer_unpruned)

    @property
    def mean_layer_flops(self) -> float:
        """Average FLOPs per layer (the figure FastV's Table 1 reports)."""
        return self.total_flops / max(1, self.num_layers)

    @property
    def reduction(self) -> float:
        """1 - pruned/unpruned FLOPs (0 when nothing was pruned)."""
        base = self.total_flops_unpruned
        return 0.0 if base == 0 else 1.0 - self.total_flops / base

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_layers": self.num_layers,
            "unpruned_tokens": list(self.unpruned),
            "tokens_per_layer": [list(rows) for rows in self.per_layer],
            "flops_per_layer": list(self.flops_per_layer),
            "flops_per_layer_unpruned": list(self.flops_per_layer_unpruned),
            "total_flops": self.total_flops,
            "total_flops_unpruned": self.total_flops_unpruned,
            "reduction": self.reduction,
        }

    def format(self) -> str:
        """A readable table: one line per layer (tokens per row, GFLOPs), then the totals."""
        lines = [f"{'layer':>5}  {'tokens (per row)':<24} {'GFLOPs':>12} {'unpruned':>12}"]
        for i, rows in enumerate(self.per_layer):
            toks = ",".join(str(n) for n in rows)
            lines.append(
                f"{i:>5}  {toks:<24} {self.flops_per_layer[i] / 1e9:>12.4f} "
                f"{self.flops_per_layer_unpruned[i] / 1e9:>12.4f}"
            )
        lines.append(
            f"total  unpruned tokens {','.join(str(n) for n in self.unpruned)}: "
            f"{self.total_flops / 1e9:.4f} of {self.total_flops_unpruned / 1e9:.4f} GFLOPs, "
            f"reduction {100 * self.reduction:.1f}%"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def combine(reports: list[LayerTokens]) -> LayerTokens:
    """Several methods' reports: unpruned = max per row, per-layer tokens = elementwise min."""
    unpruned = [max(vals) for vals in zip(*(r.unpruned for r in reports), strict=True)]
    per_layer = [
        [min(vals) for vals in zip(*rows, strict=True)]
        for rows in zip(*(r.per_layer for r in reports), strict=True)
    ]
    return LayerTokens(unpruned, per_layer)
