"""Adapters: one per architecture, found from the model's ``config.model_type``."""

from lvlm_steer.adapters import gemma, idefics3, internvl, llava, mistral3, qwen_vl  # noqa: F401  (register)
from lvlm_steer.adapters.base import Adapter, ImageTile
from lvlm_steer.adapters.image_inputs import ImageInputs
from lvlm_steer.adapters.registry import (
    adapter_for,
    register_adapter,
    supported_architectures,
    vision_scoring_support,
)

__all__ = [
    "Adapter",
    "ImageInputs",
    "ImageTile",
    "adapter_for",
    "register_adapter",
    "supported_architectures",
    "vision_scoring_support",
]
