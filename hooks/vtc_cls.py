"""VTC-CLS, "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (Wang et al., 2024).

Visual tokens are pruned before the LLM sees them. In the vision tower, in layers ``start_layer`` up to the
feature layer (the one whose output the LLM receives; LLaVA-1.5 uses the penultimate), the attention of the CLS
query to each patch, averaged over heads, is summed over those layers; the top-``keep`` patch features of each
image stay, in raster order, and the LLM gets only those image tokens. Nothing changes inside the LLM.

Only the CLS row is computed, never the full attention (`lvlm_steer.vision_attention`). Towers without a CLS token
(SigLIP: Idefics3 / SmolVLM, Gemma 3, PaliGemma) use instead the mean attention each patch *receives* from all
valid queries (a deviation from the paper, which needs a CLS). The adapter maps patch scores to image tokens the
way its connector maps patches (SmolVLM's and InternVL's pixel shuffle: a token's score is the sum over its
patches; Gemma 3's average pool: the mean). ``keep`` applies per vision-tower input: an image for LLaVA, Gemma 3
and PaliGemma, each crop (and the global image) for Idefics3 / SmolVLM and InternVL. Architectures whose adapter
has no ``vision_scoring`` are refused with the supported list.

The prompt shortening, positions (re-indexed contiguously, as in the paper), pre-encoded features and the
``Steering.generate`` plumbing are `lvlm_steer.vision_pruning.VisionReducer`'s; this module is the score and the
top-k. `VTCCLS.prune_inputs` gives the reduced batch itself and `VTCCLS.selection` what was kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from lvlm_steer.errors import MethodConfigError
from lvlm_steer.registry import register_method
from lvlm_steer.vision_attention import PROBE_ELEMENTS, cls_row_scores, received_scores
from lvlm_steer.vision_pruning import Reduction, Selection, TowerTokens, VisionReducer

if TYPE_CHECKING:
    from lvlm_steer.adapters.base import VisionScoring
    from lvlm_steer.steering import Steering

__all__ = ["PROBE_ELEMENTS", "VTCCLS", "Selection", "cls_row_scores", "received_scores"]


def _parse_keep(raw: str) -> float | int:
    value = float(raw)
    return int(value) if "." not in raw and value.is_integer() else value


def _format_keep(value: float | int) -> str:
    return str(value)


@register_method
@dataclass
class VTCCLS(VisionReducer):
    """Keep the top-``keep`` image tokens of each image by the vision tower's CLS attention, before the LLM."""

    name: ClassVar[str] = "vtc_cls"
    summary: ClassVar[str] = "pre-LLM pruning: keep the top-k patches by CLS attention summed over vision layers"
    paper: ClassVar[str] = "Wang et al., [CLS] Token Tells Everything Needed for Training-free Efficient MLLMs, 2024"

    keep: float = field(
        default=128,
        metadata={
            "help": "image tokens kept per image (or crop): a count (64, 128, 256 of 576 in the paper) or a "
            "fraction in (0, 1] written with a dot (0.25)",
            "parse": _parse_keep,
            "format": _format_keep,
        },
    )
    start_layer: int = field(default=16, metadata={"help": "first vision layer whose CLS attention is summed"})

    def __post_init__(self) -> None:
        is_count = type(self.keep) is int
        if (is_count and self.keep < 1) or (not is_count and not 0 < float(self.keep) <= 1):
            raise MethodConfigError(
                f"vtc_cls: keep={self.keep!r} must be a whole token count >= 1 (e.g. keep=64) or a fraction in "
                "(0, 1] written with a dot (e.g. keep=0.25)"
            )
        if not is_count:
            self.keep = float(self.keep)
        if self.start_layer < 0:
            raise MethodConfigError(f"vtc_cls: start_layer must be >= 0, got {self.start_layer}")
        self._init_reducer()

    def tokens_kept(self, per_unit: int) -> int:
        """Kept tokens of a unit that has ``per_unit`` image tokens."""
        if type(self.keep) is int:
            return self.keep
        return max(1, round(float(self.keep) * per_unit))

    # -- the reducer -------------------------------------------------------------------------------------------
    def tower_layers(self, scoring: VisionScoring) -> range:
        return range(self.start_layer, scoring.feature_layer + 1)

    def check_tower(self, scoring: VisionScoring, name: str) -> None:
        if not 0 <= self.start_layer <= scoring.feature_layer:
            raise MethodConfigError(
                f"vtc_cls: start_layer={self.start_layer} is outside this vision tower's layers "
                f"0..{scoring.feature_layer} (the LLM sees the output of layer {scoring.feature_layer}); "
                "pick start_layer in that range"
            )
        if type(self.keep) is int and self.keep > scoring.tokens_per_unit:
            raise MethodConfigError(
                f"vtc_cls: keep={self.keep} exceeds the {scoring.tokens_per_unit} image tokens of each image (or crop) "
                f"of {name}; use keep <= {scoring.tokens_per_unit}, or a fraction such as keep=0.25"
            )

    def reduce(self, tokens: TowerTokens) -> Reduction:
        """The paper's score (summed over the scored layers), then the top-k per unit in raster order."""
        scores = tokens.token_scores(tokens.attention.sum(dim=0))
        per_unit = scores.shape[1]
        k = self.tokens_kept(per_unit)
        if k > per_unit:
            raise MethodConfigError(
                f"vtc_cls: keep={self.keep} exceeds the {per_unit} image tokens per image (or crop); "
                f"use keep <= {per_unit} or a fraction"
            )
        return Reduction(kept=scores.topk(k, dim=1).indices.sort(dim=1).values, scores=scores)

    def prune_inputs(self, steering: Steering, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch the LLM should see (`VisionReducer.reduce_inputs`): kept image tokens only."""
        return self.reduce_inputs(steering, inputs)
