"""PAI, "Paying More Attention to Image" (Liu et al., ECCV 2024).

Attention step: in layers [start_layer, end_layer), all heads, on the LAST query row only (the last prompt token
at prefill, the new token at each decode step), the pre-softmax logits of image keys become ``Z + alpha * |Z|``.
Only that one row is recomputed (O(keys) per head); all other rows keep the base kernel's output.

Optional logit refinement (``cfg=True``): a text-only second stream (the same prompt with the image removed, its
own KV cache, no attention boost) runs beside generation, and the next-token log-probabilities become
``gamma * (logp_img - logp_txt) + logp_txt``, restricted to tokens with ``p_img >= plausibility * max p_img``.
The stream runs on the shared engine (`lvlm_steer.streams`): with ``alpha > 0`` (or beside other methods) the
image stream is steered and the text stream runs its own paused forward per step; with ``alpha = 0`` and no
other method both streams run in one forward of 2B rows. The mixing sees the image stream's scores after
generate's built-in processors (``suppress_tokens``, ``min_new_tokens``, ...) and before the user's own
processors and the warpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lvlm_steer.attention import AttentionCall
from lvlm_steer.attention_rows import attend, masked_softmax, replace_rows, row_logits, rows_mask
from lvlm_steer.errors import MethodConfigError
from lvlm_steer.method import Method
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method
from lvlm_steer.streams import AuxStream, StepScores, TextOnly, apply_plausibility, generate_with_streams


@register_method
@dataclass
class PAI(Method):
    """Boost image-key attention logits of the last query row; optionally contrast with a text-only stream."""

    name: ClassVar[str] = "pai"
    summary: ClassVar[str] = "last-row image logits Z + alpha*|Z| in layers [start, end); optional text-only CFG"
    paper: ClassVar[str] = "Liu et al., Paying More Attention to Image, ECCV 2024"

    alpha: float = field(default=0.5, metadata={"help": "image logit boost, >= 0 (0 = off)"})
    start_layer: int = field(default=2, metadata={"help": "first boosted layer"})
    end_layer: int = field(default=-1, metadata={"help": "one past the last boosted layer (-1 = all layers)"})
    cfg: bool = field(default=False, metadata={"help": "contrast with a text-only stream at each step"})
    gamma: float = field(default=1.1, metadata={"help": "CFG strength (1 = image stream only)"})
    plausibility: float = field(default=0.1, metadata={"help": "CFG keeps tokens with p >= this x max p"})

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise MethodConfigError(f"pai: alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.plausibility <= 1:
            raise MethodConfigError(f"pai: plausibility must be in [0, 1], got {self.plausibility}")

    def layers(self, info: ModelInfo) -> range:
        end = info.num_layers if self.end_layer == -1 else self.end_layer
        return range(self.start_layer, end)

    def validate(self, info: ModelInfo) -> None:
        end = info.num_layers if self.end_layer == -1 else self.end_layer
        if not 0 <= self.start_layer < end <= info.num_layers:
            raise MethodConfigError(
                f"pai: layers [{self.start_layer}, {end}) do not fit this model's text layers "
                f"0..{info.num_layers - 1}; need 0 <= start_layer < end_layer <= {info.num_layers}"
            )

    def requires_images(self) -> bool:
        return True

    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        return frozenset(self.layers(info)) if self.alpha > 0 else frozenset()

    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        last = call.query.shape[2] - 1
        logits = row_logits(call, last)  # (B, H, 1, K)
        image = call.context.keys_image_mask(call.key.shape[2]).to(logits.device)[:, None, None, :]
        logits = torch.where(image, logits + self.alpha * logits.abs(), logits)
        rows = attend(masked_softmax(logits, rows_mask(call, last)), call.value)
        if last == 0:  # decoding: the only row is the edited one, no base call needed
            return rows.transpose(1, 2).to(call.query.dtype)
        return replace_rows(call.base(), last, rows)

    def drives_generation(self) -> bool:
        """Only the CFG contrast runs its own loop; without it PAI is an attention edit that composes freely."""
        return self.cfg

    def needs_steered_generate(self) -> bool:
        """With ``cfg`` a plain ``model.generate`` would drop the text-only contrast: refuse it."""
        return self.cfg

    def generate(self, steering, **inputs: Any) -> Any:
        if not self.cfg:
            return steering.model.generate(**inputs)
        return generate_with_streams(steering, inputs, [TEXT_STREAM], self.combine, owner=self)

    def combine(self, step: StepScores) -> torch.Tensor:
        """``gamma * (logp_img - logp_txt) + logp_txt`` on the tokens that pass the plausibility cut of ``p_img``."""
        logp_txt = torch.log_softmax(step.aux[TEXT_STREAM.name].float(), dim=-1)
        logp_img = torch.log_softmax(step.main.float(), dim=-1)
        mixed = self.gamma * (logp_img - logp_txt) + logp_txt
        return apply_plausibility(mixed, step.main, self.plausibility)


# the CFG contrast: the same prompt without its image, decoded beside generation with the steering paused (no
# attention boost there), its own cache and its own copy of model-level state (Qwen2-VL's rope_deltas)
TEXT_STREAM = AuxStream("text", TextOnly())
