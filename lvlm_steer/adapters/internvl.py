"""InternVL: ``<img>`` + ``image_seq_length`` tokens per crop (all crops of an image in one run) + ``</img>``.

A dynamically tiled image is several crops followed by a thumbnail of the whole image; each crop is a
square grid of ``image_seq_length`` tokens. The crop arrangement is not visible in the ids, so crops are
listed in order (the last one, when there are several, is the thumbnail: kind "global").
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from lvlm_steer.adapters.base import Adapter, ImageTile, VisionScoring, _square_tile, head_projections
from lvlm_steer.adapters.registry import register_adapter
from lvlm_steer.errors import SteeringError


@register_adapter
class InternVLAdapter(Adapter):
    model_types = ("internvl",)
    multi_image = True
    display_name = "InternVL 3 (InternVLForConditionalGeneration)"
    vision_scoring_kind = "CLS"
    markers_before = 1  # <img>
    markers_after = 1  # </img>

    # -- image inputs: the crops of all images stacked, image_seq_length tokens per crop ---------------------
    def _pixel_slots(self, inputs: dict[str, Any]) -> list[tuple]:
        per_crop = int(self.config.image_seq_length)
        slots, start = [], 0
        for row in inputs["input_ids"]:
            for s, e in self.image_runs(row):
                slots.append((slice(start, start + (e - s) // per_crop),))
                start += (e - s) // per_crop
        return slots

    def vision_scoring(self) -> VisionScoring | None:
        """InternViT: a CLS token (dropped for "default"), then a pixel shuffle folds 1/ratio^2 patches per token."""
        if self.config.vision_feature_select_strategy != "default":
            return None  # "full" keeps CLS, which the square pixel shuffle cannot place
        tower = self.vision_tower()
        attention = [layer.attention for layer in tower.encoder.layer]
        feature_layer = self.config.vision_feature_layer % (len(attention) + 1) - 1
        side = int(tower.embeddings.patch_embeddings.num_patches**0.5)
        ratio = self.config.downsample_ratio
        shuffle = self.model.model.pixel_shuffle

        def to_tokens(scores: torch.Tensor) -> torch.Tensor:  # a token's score: the sum over its patches
            grid = shuffle(scores[:, 1:].reshape(-1, side, side, 1), scale_factor=ratio)
            return grid.reshape(grid.shape[0], -1, grid.shape[-1]).sum(dim=-1)

        # InternViT normalises the whole q / k projection before splitting heads (q_norm / k_norm)
        project = partial(head_projections, norms=True)
        tokens = int(self.config.image_seq_length)
        return VisionScoring(attention, feature_layer, True, tokens, to_tokens, project=project)

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
