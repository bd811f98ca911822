"""Mistral 3 (Pixtral vision): rows of ``[IMG]`` tokens, each row closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``.

The grid is read from the ids: consecutive runs separated by exactly one token are rows of one image.
"""

from __future__ import annotations

from typing import Any

import torch

from lvlm_steer.adapters.base import Adapter, ImageTile, Span, grid_positions
from lvlm_steer.adapters.registry import register_adapter
from lvlm_steer.errors import SteeringError


@register_adapter
class Mistral3Adapter(Adapter):
    model_types = ("mistral3",)
    multi_image = True
    display_name = "Mistral 3 (Mistral3ForConditionalGeneration)"
    # image inputs: one (C, H, W) per image, padded to the batch's largest; the real sizes per image
    pixel_keys = ("pixel_values", "image_sizes")
    image_keys = ("image_sizes",)

    def _images(self, row: torch.Tensor) -> list[list[Span]]:
        images: list[list[Span]] = []
        for s, e in self.image_runs(row):
            if images and s - images[-1][-1][1] == 1:  # separated by one [IMG_BREAK]
                images[-1].append((s, e))
            else:
                images.append([(s, e)])
        return images

    def image_spans(self, row: torch.Tensor) -> list[Span]:
        n = row.shape[0]
        return [(runs[0][0], min(n, runs[-1][1] + 1)) for runs in self._images(row)]

    def image_tiles(self, row: torch.Tensor, inputs: dict[str, Any], row_index: int) -> list[ImageTile]:
        tiles = []
        for i, runs in enumerate(self._images(row)):
            cols = runs[0][1] - runs[0][0]
            if any(e - s != cols for s, e in runs):
                raise SteeringError(f"Mistral3 image {i}: rows of unequal length {[e - s for s, e in runs]}")
            tiles.append(ImageTile(i, "image", grid_positions(runs[0][0], len(runs), cols, row_stride=cols + 1)))
        return tiles
