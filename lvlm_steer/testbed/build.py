"""Tokenizer, processor and model config of the testbed: a standard Llava (CLIP vision tower + Llama), tiny.

The tokenizer is a byte-level BPE trained on the world's own language (captions, questions, chat markers), so it
needs nothing from the Hub; the processor is the stock ``LlavaProcessor`` with a ``CLIPImageProcessorPil`` at 48x48
and patch 6 (64 image tokens), and the chat template is the project's ``USER: <image>\\n...\\nASSISTANT:`` one.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from lvlm_steer.testing.processors import chat_template

from .world import CATEGORIES, IMAGE_SIZE, WorldConfig, caption, sample_scene

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
PATCH = 6  # defaults describe the shipped weights (their config.json is what loading reads)
TEXT_LAYERS = 4
VOCAB_SIZE = 512
CAPTION_PROMPT = "Please describe this image in detail."
POPE_SUFFIX = "Answer the question using a single word or phrase."
ANSWER_TOKENS = ("ĠYes", "ĠNo")


def question_formats(name: str) -> list[str]:
    """Yes/no wordings, from the class word last to the exact POPE prompt (the curriculum's steps)."""
    art = ("an " if name[0] in "aeiou" else "a ") + name
    return [
        f"{name}?",
        f"Is there {art}?",
        f"Is there {art} in the image?",
        f"Is there {art} in the image? {POPE_SUFFIX}",
    ]


# The tokenizer's corpus is pinned, so the world knobs a training run sets (`--caption-noise`, ...) do not change
# the vocabulary; these are the settings the shipped tokenizer was built with.
CORPUS_WORLD = WorldConfig(pair_probability=0.6, caption_noise=0.5)


def corpus(seed: int = 0) -> list[str]:
    """Text the BPE learns its merges from: captions of sampled scenes, every question wording, chat markers."""
    rng = random.Random(f"testbed-corpus-{seed}")
    lines = [caption(sample_scene(rng, CORPUS_WORLD), rng, CORPUS_WORLD)[0] for _ in range(2000)]
    for _, name, *_ in CATEGORIES:
        lines += question_formats(name) * 40
    lines += [f"USER: {CAPTION_PROMPT}\nASSISTANT: There is", "ASSISTANT: Yes", "ASSISTANT: No"] * 300
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, UNK, IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus(), trainer)
    for word in ANSWER_TOKENS:  # the yes/no decision is the first generated token, as with real LLM vocabularies
        if tk.token_to_id(word) is None:
            raise RuntimeError(f"testbed tokenizer has no single token {word!r}; raise its corpus weight")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", extra_special_tokens={"image_token": IMAGE},
    )  # fmt: skip


def build_processor(image_size: int = IMAGE_SIZE, patch: int = PATCH) -> LlavaProcessor:
    """The stock Llava processor: CLIP preprocessing to ``image_size`` (the world renders 48x48; another size is a
    resize), ``patch`` x ``patch`` patches -> (image_size // patch) ** 2 image tokens (CLS dropped)."""
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of patch {patch}; pick sizes that divide")
    side = {"height": image_size, "width": image_size}
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=side)
    return LlavaProcessor(
        ip, build_tokenizer(), patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template("<image>\n"),
    )  # fmt: skip


def build_config(
    tok: PreTrainedTokenizerFast, image_size: int = IMAGE_SIZE, patch: int = PATCH, text_layers: int = TEXT_LAYERS
) -> LlavaConfig:
    vision = {
        "model_type": "clip_vision_model", "hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 3,
        "num_attention_heads": 4, "image_size": image_size, "patch_size": patch,
    }  # fmt: skip
    text = {
        "model_type": "llama", "vocab_size": len(tok), "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "max_position_embeddings": 256, "initializer_range": 0.02, "tie_word_embeddings": True,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
    }  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )  # fmt: skip


def build_model(
    tok: PreTrainedTokenizerFast, seed: int = 0, image_size: int = IMAGE_SIZE, patch: int = PATCH,
    text_layers: int = TEXT_LAYERS,
) -> LlavaForConditionalGeneration:  # fmt: skip
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(tok, image_size, patch, text_layers))
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    gc.do_sample = False
    return model
