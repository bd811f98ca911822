"""Training batches: captions and yes/no conversations about world images, tokenized the way the Llava processor does.

Prompts go through the model's own chat template and the image token is expanded to the processor's count, so a
trained model sees at test time exactly the token layout it learned on (a conversation's first turn is exactly a
single POPE prompt). The loss covers only the answer tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lvlm_steer.prompts import chat_prompt

from .build import CAPTION_PROMPT, IMAGE, question_formats
from .world import DEFAULT_WORLD, NAMES, Scene, WorldConfig, caption, render, sample_scene


def image_tokens(processor) -> int:
    """Image tokens the processor expands ``<image>`` to: (crop side // patch) ** 2, CLS dropped."""
    crop = processor.image_processor.crop_size
    return (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)


@dataclass
class Sample:
    image: object | None  # PIL image, or None for a text-only sample
    prompt: str
    answer: str
    follow_ups: list[tuple[str, str]] = field(default_factory=list)  # later (question, answer) turns, same image
    scene: Scene | None = None  # the ground truth behind the image


def wording_weights(progress: float) -> list[float]:
    """Curriculum over `question_formats`: class word last first, the exact POPE wording dominant later."""
    f = min(1.0, max(0.0, progress / 0.6))
    start, end = [0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.2, 0.6]
    return [a + (b - a) * f for a, b in zip(start, end, strict=True)]


def scene_with(rng: random.Random, name: str, present: bool, cfg: WorldConfig) -> Scene:
    """A natural scene conditioned on ``name`` being drawn (or not): rejection sampling keeps the co-occurrence and
    popularity statistics of every other object."""
    while True:
        scene = sample_scene(rng, cfg)
        if (name in scene.objects) == present:
            return scene


def question(rng: random.Random, name: str, progress: float) -> str:
    return rng.choices(question_formats(name), weights=wording_weights(progress))[0]


def make_samples(
    rng: random.Random, n: int, text_only: bool, progress: float, cfg: WorldConfig = DEFAULT_WORLD,
    caption_share: float = 0.35, follow_ups: int = 3, class_balanced: bool = False, noisy_answers: bool = False,
) -> list[Sample]:  # fmt: skip
    """``n`` samples: captions (with the world's caption noise) and yes/no conversations about one image.

    Each turn asks, with equal chance, about one of the image's objects or one absent class (uniformly drawn), so
    popular classes are more often answered "yes", as in instruction data about real photos: the model learns that
    prior, and the co-occurrence one, beside what it sees. ``class_balanced`` instead asks the first question about
    a uniformly drawn class, present or absent with equal chance, which removes the popularity prior (measured in
    MODEL_CARD.md). The ``follow_ups`` later turns ask about the same image, like LLaVA's multi-turn instruction
    data: several decisions per image forward. ``noisy_answers`` gives the conversations the captions' annotation
    noise: at the world's ``caption_noise`` rate (when the scene has one) an absent partner counts as present, so
    it is answered "Yes", as it would be named in a noisy caption.
    """
    names = list(NAMES.values())
    samples = []
    for _ in range(n):
        if text_only or rng.random() < caption_share:
            scene = sample_scene(rng, cfg)
            text, _ = caption(scene, rng, cfg)
            image = None if text_only else render(scene, cfg)
            samples.append(Sample(image, CAPTION_PROMPT, " " + text, scene=scene))
            continue
        turns: list[tuple[str, str]] = []
        seen: set[str] = set()
        if class_balanced:
            asked, positive = rng.choice(names), rng.random() < 0.5
            scene = scene_with(rng, asked, positive, cfg)
            turns.append((question(rng, asked, progress), " Yes" if positive else " No"))
            seen.add(asked)
        else:
            scene = sample_scene(rng, cfg)
        annotated = list(scene.objects)  # what the (possibly noisy) annotation of this image says is there
        if noisy_answers and scene.noisy and rng.random() < cfg.caption_noise:
            annotated.append(rng.choice(scene.noisy))
        while len(turns) < 1 + follow_ups:  # each class at most once per conversation
            positive = rng.random() < 0.5
            pool = [x for x in names if (x in annotated) == positive and x not in seen]
            if not pool:
                break
            seen.add(name := rng.choice(pool))
            turns.append((question(rng, name, progress), " Yes" if positive else " No"))
        (prompt, answer), *rest = turns
        samples.append(Sample(render(scene, cfg), prompt, answer, rest, scene))
    return samples


def chat_prefix(processor, prompt: str, with_image: bool) -> str:
    text = chat_prompt(processor, prompt, n_images=1 if with_image else 0)
    return text.replace(IMAGE, IMAGE * image_tokens(processor))


def collate(processor, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (answer tokens only) and ``pixel_values``."""
    tok = processor.tokenizer
    prefixes = tok([chat_prefix(processor, s.prompt, s.image is not None) for s in samples])["input_ids"]
    rows = []  # (token ids, label ids with -100 outside answers)
    for sample, prefix in zip(samples, prefixes, strict=True):
        ids, labels = list(prefix), [-100] * len(prefix)
        for k, (prompt, answer) in enumerate([(sample.prompt, sample.answer), *sample.follow_ups]):
            if k:  # a later turn, rendered as the chat template renders one: "\nUSER: ...\nASSISTANT:"
                turn = tok(f"\nUSER: {prompt}\nASSISTANT:", add_special_tokens=False)["input_ids"]
                ids, labels = ids + turn, labels + [-100] * len(turn)
            reply = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids, labels = ids + reply, labels + reply
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, row_labels) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row_labels)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    images = [s.image for s in samples if s.image is not None]
    if images:
        batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch
