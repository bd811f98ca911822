"""Gemma 3 (``<start_of_image>`` + soft tokens + ``<end_of_image>``) and PaliGemma (image tokens first, no markers)."""

from __future__ import annotations

import torch
from torch import nn

from lvlm_steer.adapters.base import NO_CLS, Adapter, VisionScoring
from lvlm_steer.adapters.registry import register_adapter


def _siglip_attention(tower: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a SigLIP tower (``SiglipVisionModel`` or its inner transformer)."""
    return [layer.self_attn for layer in getattr(tower, "vision_model", tower).encoder.layers]


@register_adapter
class Gemma3Adapter(Adapter):
    model_types = ("gemma3",)
    multi_image = True
    display_name = "Gemma 3 (Gemma3ForConditionalGeneration)"
    vision_scoring_kind = NO_CLS
    markers_before = 1  # boi
    markers_after = 1  # eoi

    def vision_scoring(self) -> VisionScoring:
        """SigLIP (no CLS); the projector average-pools k x k patches into one token, so the scores are pooled alike."""
        attention = _siglip_attention(self.vision_tower())
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        pool = self.model.model.multi_modal_projector.avg_pool

        def to_tokens(scores: torch.Tensor) -> torch.Tensor:
            return pool(scores.view(-1, 1, side, side)).flatten(1)

        return VisionScoring(attention, len(attention) - 1, False, int(self.config.mm_tokens_per_image), to_tokens)


@register_adapter
class PaliGemmaAdapter(Adapter):
    model_types = ("paligemma",)
    display_name = "PaliGemma (PaliGemmaForConditionalGeneration)"
    vision_scoring_kind = NO_CLS
    generated_token_type = 1  # token type 0 is the bidirectional prefix, 1 the causal suffix
    bidirectional_prompt = True

    def vision_scoring(self) -> VisionScoring:
        """SigLIP (no CLS), one token per patch of the last layer."""
        attention = _siglip_attention(self.vision_tower())
        vision = self.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        return VisionScoring(attention, len(attention) - 1, False, tokens, lambda scores: scores)
