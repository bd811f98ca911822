"""Deterministic images, chat prompts and left-padded batches for the tiny test models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

DEFAULT_IMAGE_SIZE = (64, 48)  # (W, H): big enough that every arch's tiling / splitting produces several tiles


def make_image(seed: int = 0, size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """A reproducible RGB image: a few solid coloured rectangles on low-contrast noise.

    Structure (not just noise) keeps vision features distinct between seeds and between image regions.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    pixels = rng.integers(64, 192, size=(height, width, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, max(1, width - 4))), int(rng.integers(0, max(1, height - 4)))
        x1 = int(rng.integers(x0 + 1, width + 1))
        y1 = int(rng.integers(y0 + 1, height + 1))
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)  # uint8 (H, W, 3) -> RGB


def tiny_batch(
    processor: ProcessorMixin,
    prompts: str | Sequence[str],
    images: Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]] | None = None,
) -> BatchFeature:
    """``processor(images=..., text=..., padding=True, return_tensors="pt")`` with left padding.

    ``images`` lists the images of all prompts in order (``None`` for text-only). They are grouped per prompt by
    counting the processor's image placeholder, because some processors (Gemma3, SmolVLM) read a flat list as the
    images of one sample. PaliGemma's processor also returns training ``labels``; they are dropped so the batch can
    go straight into ``model(**enc)`` / ``generate``.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kwargs = {}
    if images is not None:
        kwargs["images"] = _images_per_prompt(processor, prompts, images)
    enc = processor(text=prompts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
    enc.pop("labels", None)
    return enc


def _images_per_prompt(processor: ProcessorMixin, prompts: list[str], images) -> list[list[Image.Image]]:
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if images and not isinstance(images[0], Image.Image):  # already grouped per prompt
        return [list(group) for group in images]
    counts = [prompt.count(processor.image_token) for prompt in prompts]
    if sum(counts) != len(images):
        raise ValueError(
            f"{len(images)} images for {sum(counts)} {processor.image_token!r} placeholders in the prompts"
        )
    starts = np.cumsum([0, *counts])
    return [images[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
