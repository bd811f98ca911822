"""InternVL: ``<img>`` + ``image_seq_length`` tokens per crop (all crops of an image in one run) + ``</img>``.

A dynamically tiled image is several crops followed by a thumbnail of the whole image; each crop is a
square grid of ``image_seq_length`` tokens. The crop arrangement is not visible in the ids, so crops are
listed in order (the last one, when there are several, is the thumbnail: kind "global").
"""

from __future__ import annotations

from typing import Any

import torch

from lvlm_steer.adapters.base import Adapter, ImageTile, _square_tile
from lvlm_steer.adapters.registry import register_adapter
from lvlm_steer.errors import SteeringError


@register_adapter
class InternVLAdapter(Adapter):
    model_types = ("internvl",)
    multi_image = True
    display_name = "InternVL 3 (InternVLForConditionalGeneration)"
    markers_before = 1  # <img>
    markers_after = 1  # </img>

    def image_tiles(self, row: torch.Tensor, inputs: dict[str, Any], row_index: int) -> list[ImageTile]:
        per_crop = int(self.config.image_seq_length)
        tiles = []
        for i, (s, e) in enumerate(self.image_runs(row)):
            n_crops, extra = divmod(e - s, per_crop)
            if extra:
                raise SteeringError(f"InternVL image {i}: {e - s} tokens are not a multiple of {per_crop} per crop")
            for k in range(n_crops):
                kind = "global" if n_crops > 1 and k == n_crops - 1 else ("tile" if n_crops > 1 else "image")
                tiles.append(_square_tile(i, kind, s + k * per_crop, s + (k + 1) * per_crop))
        return tiles
