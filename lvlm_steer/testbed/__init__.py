"""The built-in testbed: a small Llava trained here on a synthetic COCO-style world (``--model builtin:testbed``).

Ground truth is known (the world generator in `world`), hallucinations come from a learned co-occurrence prior and
noisy captions, and the weights ship inside the package, so every command has a model that works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).with_name("weights")
SPEC = "builtin:testbed"


def load_testbed(weights_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(model, processor) of the shipped testbed, in eval mode, left padding; nothing is downloaded."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from lvlm_steer.compat import load_kwargs

    path = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"testbed weights not found in {path}; train them with `python -m lvlm_steer.testbed.train --out DIR` "
            "and pass DIR/final, or reinstall lvlm-steer (the weights are package data)"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, **load_kwargs()).eval()
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor


__all__ = ["SPEC", "WEIGHTS_DIR", "load_testbed"]
