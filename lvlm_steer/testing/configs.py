"""Tiny configs of the real transformers VLM classes, wired to the ids of the tiny tokenizer.

Text models share one shape (hidden 64, 4 query heads, 2 KV heads so GQA is exercised, 3 layers); vision towers are
2-layer, 28x28 input, patch 7. ``TEXT_INIT_RANGE`` is larger than the usual 0.02 so that attention is far from
uniform and head-level interventions visibly change the logits.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

from .processors import GRID_PINPOINTS, PATCH, PIXTRAL_LONGEST, QWEN_MERGE, TOKENS_PER_TILE, VISION_SIZE

ARCHITECTURES: tuple[str, ...] = (
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3",
    "smolvlm", "gemma3", "paligemma", "internvl", "mistral3",
)  # fmt: skip

MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "idefics3": Idefics3ForConditionalGeneration,
    "smolvlm": SmolVLMForConditionalGeneration,
    "gemma3": Gemma3ForConditionalGeneration,
    "paligemma": PaliGemmaForConditionalGeneration,
    "internvl": InternVLForConditionalGeneration,
    "mistral3": Mistral3ForConditionalGeneration,
}

TEXT_LAYERS = 3
TEXT_HEADS, TEXT_KV_HEADS, HEAD_DIM = 4, 2, 16
TEXT_INIT_RANGE = 0.15


def _text(tok: PreTrainedTokenizerBase, model_type: str, **extra: Any) -> dict[str, Any]:
    """Shared text-model shape; vocab and special ids come from the tokenizer."""
    return {
        "model_type": model_type,
        "vocab_size": len(tok),
        "hidden_size": TEXT_HEADS * HEAD_DIM,
        "intermediate_size": 128,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 512,
        "initializer_range": TEXT_INIT_RANGE,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        **extra,
    }


def _vision(model_type: str, **extra: Any) -> dict[str, Any]:
    """A 2-layer ViT on 28x28 inputs with 7x7 patches (CLIP / SigLIP / Idefics3 / InternVL / Pixtral)."""
    return {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": VISION_SIZE,
        "patch_size": PATCH,
        **extra,
    }


def _qwen_vision(arch: str) -> dict[str, Any]:
    common = {
        "depth": 2,
        "num_heads": 4,
        "patch_size": PATCH,
        "spatial_merge_size": QWEN_MERGE,
        "temporal_patch_size": 2,
    }
    if arch == "qwen2_vl":
        return {**common, "embed_dim": 32, "hidden_size": 64}  # hidden_size = LM width (merger output)
    # Qwen2.5-VL: window attention over 4x4 merged tokens (56 px) in block 0, full attention in block 1.
    return {**common, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
            "window_size": 4 * PATCH * QWEN_MERGE, "fullatt_block_indexes": [1]}  # fmt: skip


def tiny_config(arch: str, tok: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """The config of ``arch``'s tiny model; ``tok`` must be the tokenizer of ``tiny_processor(arch)``."""
    image_id = tok.convert_tokens_to_ids(tok.image_token) if hasattr(tok, "image_token") else None
    if arch in ("llava", "llava_next"):
        cls, extra = (
            (LlavaConfig, {}) if arch == "llava" else (LlavaNextConfig, {"image_grid_pinpoints": GRID_PINPOINTS})
        )
        return cls(
            vision_config=_vision("clip_vision_model"), text_config=_text(tok, "llama"), image_token_id=image_id,
            vision_feature_layer=-1, vision_feature_select_strategy="default", **extra,
        )  # fmt: skip
    if arch == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=_vision("siglip_vision_model"), text_config=_text(tok, "qwen2"), image_token_id=image_id,
            video_token_id=tok.video_token_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=GRID_PINPOINTS, vision_aspect_ratio="anyres_max_9",
        )  # fmt: skip
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        # M-RoPE splits the rotary half-dim (8) into temporal/height/width sections.
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        cls = Qwen2VLConfig if arch == "qwen2_vl" else Qwen2_5_VLConfig
        return cls(
            vision_config=_qwen_vision(arch), text_config=_text(tok, f"{arch}_text", rope_parameters=rope),
            image_token_id=image_id, video_token_id=tok.video_token_id,
            vision_start_token_id=tok.vision_bos_token_id, vision_end_token_id=tok.vision_eos_token_id,
        )  # fmt: skip
    if arch in ("idefics3", "smolvlm"):
        cls = Idefics3Config if arch == "idefics3" else SmolVLMConfig
        return cls(
            vision_config=_vision(f"{arch}_vision"), text_config=_text(tok, "llama"), image_token_id=image_id,
            scale_factor=2, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    if arch == "gemma3":
        text = _text(
            tok, "gemma3_text", query_pre_attn_scalar=HEAD_DIM, sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"][:TEXT_LAYERS],
        )  # fmt: skip
        return Gemma3Config(
            vision_config=_vision("siglip_vision_model"), text_config=text, mm_tokens_per_image=TOKENS_PER_TILE[arch],
            image_token_index=image_id, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
            initializer_range=TEXT_INIT_RANGE,
        )  # fmt: skip
    if arch == "paligemma":
        width = TEXT_HEADS * HEAD_DIM
        return PaliGemmaConfig(
            vision_config=_vision("siglip_vision_model", projection_dim=width), text_config=_text(tok, "gemma"),
            image_token_index=image_id, vocab_size=len(tok), projection_dim=width, hidden_size=width,
        )  # fmt: skip
    if arch == "internvl":
        vision = _vision("internvl_vision", image_size=[VISION_SIZE] * 2, patch_size=[PATCH] * 2)
        return InternVLConfig(
            vision_config=vision, text_config=_text(tok, "qwen2"), image_token_id=tok.context_image_token_id,
            image_seq_length=TOKENS_PER_TILE[arch], downsample_ratio=0.5,
        )  # fmt: skip
    if arch == "mistral3":
        return Mistral3Config(
            vision_config=_vision("pixtral", head_dim=8, image_size=PIXTRAL_LONGEST), text_config=_text(tok, "mistral"),
            image_token_index=image_id, spatial_merge_size=2,
        )  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r}")
