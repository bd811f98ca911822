"""Gemma 3 (``<start_of_image>`` + soft tokens + ``<end_of_image>``) and PaliGemma (image tokens first, no markers)."""

from __future__ import annotations

from lvlm_steer.adapters.base import Adapter
from lvlm_steer.adapters.registry import register_adapter


@register_adapter
class Gemma3Adapter(Adapter):
    model_types = ("gemma3",)
    multi_image = True
    display_name = "Gemma 3 (Gemma3ForConditionalGeneration)"
    markers_before = 1  # boi
    markers_after = 1  # eoi


@register_adapter
class PaliGemmaAdapter(Adapter):
    model_types = ("paligemma",)
    display_name = "PaliGemma (PaliGemmaForConditionalGeneration)"
    generated_token_type = 1  # token type 0 is the bidirectional prefix, 1 the causal suffix
