"""Training batches: (image, prompt, answer) samples of the world, tokenized the way the Llava processor does.

Prompts go through the model's own chat template and the image token is expanded to the processor's count, so a
trained model sees at test time exactly the token layout it learned on. The loss covers only the answer tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .build import CAPTION_PROMPT, IMAGE, question_formats
from .world import DEFAULT_WORLD, NAMES, WorldConfig, caption, render, sample_scene


def image_tokens(processor) -> int:
    """Image tokens the processor expands ``<image>`` to: (crop side // patch) ** 2, CLS dropped."""
    crop = processor.image_processor.crop_size
    return (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)


@dataclass
class Sample:
    image: object | None  # PIL image, or None for a text-only sample
    prompt: str
    answer: str


def wording_weights(progress: float) -> list[float]:
    """Curriculum over `question_formats`: class word last first, the exact POPE wording dominant later."""
    f = min(1.0, max(0.0, progress / 0.6))
    start, end = [0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.2, 0.6]
    return [a + (b - a) * f for a, b in zip(start, end, strict=True)]


def make_samples(
    rng: random.Random, n: int, text_only: bool, progress: float, cfg: WorldConfig = DEFAULT_WORLD,
    caption_share: float = 0.5,
) -> list[Sample]:  # fmt: skip
    """``n`` samples: captions (with the world's caption noise) and yes/no questions (half present, half absent)."""
    names = list(NAMES.values())
    samples = []
    for _ in range(n):
        scene = sample_scene(rng, cfg)
        if text_only or rng.random() < caption_share:
            text, _ = caption(scene, rng, cfg)
            image = None if text_only else render(scene, cfg)
            samples.append(Sample(image, CAPTION_PROMPT, " " + text))
            continue
        positive = rng.random() < 0.5
        pool = scene.objects if positive else [x for x in names if x not in scene.objects]
        name = rng.choice(pool)
        wording = rng.choices(question_formats(name), weights=wording_weights(progress))[0]
        samples.append(Sample(render(scene, cfg), wording, " Yes" if positive else " No"))
    return samples


def chat_prefix(processor, prompt: str, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return text.replace(IMAGE, IMAGE * image_tokens(processor))


def collate(processor, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (answer tokens only) and ``pixel_values``."""
    tok = processor.tokenizer
    prefixes = tok([chat_prefix(processor, s.prompt, s.image is not None) for s in samples])["input_ids"]
    answers = tok([s.answer for s in samples], add_special_tokens=False)["input_ids"]
    rows = [(p, a + [tok.eos_token_id]) for p, a in zip(prefixes, answers, strict=True)]
    length = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    images = [s.image for s in samples if s.image is not None]
    if images:
        batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch
