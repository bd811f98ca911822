"""The benchmark model every benchmark uses, defined once.

The real SmolVLM-256M-Instruct architecture (Idefics3 class; a 30-layer Llama text model, hidden 576, 9 heads,
3 KV heads) built from its real config with random weights, and its real processor: one 512x512 image
with image splitting becomes 17 tiles x 64 = 1088 image tokens, 1139 prompt tokens in all. Interventions act
in the language model, so the SigLIP tower (12 x 768, ~175 s per image on 2 CPU cores) is reduced to one
small layer; otherwise its cost would hide what is measured.

Variants: ``full`` (as above) and ``small`` (4 text layers, no image splitting: 64 image tokens) for quick
iteration. The config and processor files are read from ``shared/reference/smolvlm-256m-instruct`` beside
the checkout (or ``$LVLM_STEER_REFERENCE``); they are never copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

BENCH_VARIANTS = ("full", "small")
SMOLVLM_DIR = "smolvlm-256m-instruct"
REDUCED_VISION = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}


def reference_dir() -> Path:
    """The shared reference folder: ``$LVLM_STEER_REFERENCE``, else ``../shared/reference`` from the checkout or cwd."""
    candidates = []
    if os.environ.get("LVLM_STEER_REFERENCE"):
        candidates.append(Path(os.environ["LVLM_STEER_REFERENCE"]))
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "reference", Path.cwd().parent / "shared" / "reference"]
    for path in candidates:
        if (path / SMOLVLM_DIR / "config.json").is_file():
            return path
    raise FileNotFoundError(
        "the benchmark model needs the SmolVLM-256M reference files (config, tokenizer, processor); looked in "
        + ", ".join(str(c) for c in candidates)
        + ". Set LVLM_STEER_REFERENCE to the folder that holds smolvlm-256m-instruct/."
    )


def benchmark_model(variant: str = "full", seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, processor, description) of the benchmark model; random weights, fixed seed."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if variant not in BENCH_VARIANTS:
        raise ValueError(f"unknown benchmark variant {variant!r}; choose one of {', '.join(BENCH_VARIANTS)}")
    path = reference_dir() / SMOLVLM_DIR
    config = AutoConfig.from_pretrained(path)
    for key, value in REDUCED_VISION.items():
        setattr(config.vision_config, key, value)
    if variant == "small":
        config.text_config.num_hidden_layers = 4
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(path)
    if variant == "small":
        processor.image_processor.do_image_splitting = False
    description = {
        "name": f"bench:{variant}",
        "architecture": type(model).__name__,
        "source": str(path),
        "weights": f"random (seed {seed})",
        "text_layers": config.text_config.num_hidden_layers,
        "vision_tower": "reduced to 1 layer x 64 (real: 12 x 768) so its cost does not mask the language model",
        "image_splitting": variant == "full",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, processor, description


def benchmark_image(size: int = 512, seed: int = 0) -> Image.Image:
    """A deterministic 512x512 noise image (its content does not matter to timing)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def benchmark_inputs(processor: Any, prompt: str = "Describe the image.", batch_size: int = 1) -> dict[str, Any]:
    """The benchmark prompt: one 512x512 image per row, the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [[benchmark_image(seed=i)] for i in range(batch_size)]
    return dict(processor(images=images, text=[text] * batch_size, return_tensors="pt", padding=True))
