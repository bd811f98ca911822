"""Build tiny random VLMs of the real transformers classes, fully offline."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, ProcessorMixin

from .configs import ARCHITECTURES, MODEL_CLASSES, TEXT_INIT_RANGE, tiny_config
from .processors import tiny_processor

# Parameters that the library initialises to zero (trained checkpoints never have them at zero). Left at zero, Gemma3's
# projector would make every image embedding 0 (logits would ignore the image) and InternVL's vision tower would have
# no position information, so they are redrawn from the same seeded generator.
_ZERO_INIT_REDRAW: dict[str, dict[str, float]] = {
    "gemma3": {"model.multi_modal_projector.mm_input_projection_weight": TEXT_INIT_RANGE},
    "internvl": {
        "model.vision_tower.embeddings.cls_token": 0.02,
        "model.vision_tower.embeddings.position_embeddings": 0.02,
    },
}


def tiny_model(arch: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A seeded fp32 model of ``arch`` in eval mode (default sdpa attention) and its matching processor.

    The config is built from the processor's tokenizer so the vocabulary and every image/marker token id agree.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    processor = tiny_processor(arch)
    config = tiny_config(arch, processor.tokenizer)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch]._from_config(config, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, std in _ZERO_INIT_REDRAW.get(arch, {}).items():
            params[name].normal_(0.0, std)
    return model.eval(), processor
