"""A tiny BPE tokenizer trained in-process, so tests never need the Hub.

One byte-level BPE is trained once per process on a small generated English corpus. Every multimodal marker token that
any supported processor looks for is a special token of that single vocabulary, so token ids of the markers are the
same for every architecture. Each architecture gets its own fresh ``PreTrainedTokenizerFast`` wrapper because some
processors (PaliGemma, Idefics3) add tokens to the tokenizer they are given.
"""

from __future__ import annotations

import functools
import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# Marker tokens needed by the processors (see transformers/models/*/processing_*.py).
IDEFICS3_ROW_COL = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
MULTIMODAL_TOKENS = (
    "<image>", "<video>",                                                     # llava*, idefics3, smolvlm, paligemma
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",   # qwen2(.5)-vl
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",        # idefics3 / smolvlm
    *IDEFICS3_ROW_COL,
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",               # gemma3
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",                                      # pixtral / mistral3
    "<img>", "</img>", "<IMG_CONTEXT>",                                       # internvl
)  # fmt: skip
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *MULTIMODAL_TOKENS)

# Named special-token attributes (``tok.image_token``, ``tok.image_token_id``, ...) that each processor reads.
_QWEN = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
_IDEFICS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
TOKEN_ATTRIBUTES: dict[str, dict[str, str]] = {
    "llava": {"image_token": "<image>"},
    "llava_next": {"image_token": "<image>"},
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "idefics3": _IDEFICS,
    "smolvlm": {**_IDEFICS, "video_token": "<video>"},
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    "paligemma": {"image_token": "<image>"},
    "internvl": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
    "mistral3": {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"},
}

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "grey")
_OBJECTS = ("car", "dog", "cat", "ball", "box", "cup", "tree", "house", "bird", "chair", "table", "book", "boat")
_PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle", "next to the window")
_TEMPLATES = (
    "The {o} is {c}.",
    "Is there a {c} {o} in the image?",
    "What colour is the {o}?",
    "I see a {c} {o} {p}.",
    "How many {o}s are {p}?",
    "Describe the {c} {o} {p}.",
    "There are two {c} {o}s and one {o2}.",
    "USER: What is in the image?\nASSISTANT: A {c} {o} {p}.",
    "User: Where is the {o}?\nAssistant: The {o} is {p}.",
)


def corpus() -> list[str]:
    """A few hundred short, deterministic sentences about objects, colours and questions."""
    lines = []
    for i, (t, c, o) in enumerate(itertools.product(_TEMPLATES, _COLOURS, _OBJECTS)):
        if i % 3 == 0:  # a third of the grid is plenty for BPE merges and keeps training fast
            lines.append(t.format(c=c, o=o, o2=_OBJECTS[(i + 1) % len(_OBJECTS)], p=_PLACES[i % len(_PLACES)]))
    return lines


@functools.lru_cache(maxsize=1)
def _trained_json(vocab_size: int = 400) -> str:
    """Train the BPE once per process; kept as JSON so every wrapper gets an independent copy."""
    tk = Tokenizer(models.BPE(unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus(), trainer)
    return tk.to_str()


def tiny_tokenizer(arch: str | None = None) -> PreTrainedTokenizerFast:
    """A fresh left-padding tokenizer with the named marker attributes that ``arch``'s processor expects."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json()),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        extra_special_tokens=dict(TOKEN_ATTRIBUTES.get(arch, {})),
    )
