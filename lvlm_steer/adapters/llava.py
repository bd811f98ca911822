"""LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: one run of ``<image>`` tokens per image, no markers.

NeXT/OneVision runs hold the base grid followed by the stitched high-resolution tiles, unpadded to the
image's aspect ratio, with one newline feature closing each row. The newline features are image tokens
(they come from the image), but they are not grid cells, so the grid skips them.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from lvlm_steer.adapters.base import Adapter, ImageTile, VisionScoring, grid_positions
from lvlm_steer.adapters.registry import register_adapter
from lvlm_steer.errors import SteeringError


@register_adapter
class LlavaAdapter(Adapter):
    model_types = ("llava",)
    display_name = "LLaVA-1.5 (LlavaForConditionalGeneration)"
    vision_scoring_kind = "CLS"

    def vision_scoring(self) -> VisionScoring | None:
        """CLIP-style tower: features are ``hidden_states[vision_feature_layer]``, minus CLS for "default"."""
        tower = self.vision_tower()
        body = getattr(tower, "vision_model", tower)
        layers = getattr(getattr(body, "encoder", None), "layers", None)
        embeddings = getattr(body, "embeddings", None)
        if layers is None or not hasattr(embeddings, "num_patches"):
            return None
        attention = [getattr(layer, "self_attn", None) for layer in layers]
        if not all(hasattr(a, "q_proj") and hasattr(a, "k_proj") for a in attention):
            return None
        chosen = self.config.vision_feature_layer
        chosen = max(c % (len(layers) + 1) for c in chosen) if isinstance(chosen, list) else chosen
        feature_layer = chosen % (len(layers) + 1) - 1  # hidden_states[i] is the output of layer i - 1
        cls = hasattr(embeddings, "class_embedding")
        drop = 1 if self.config.vision_feature_select_strategy == "default" else 0

        def to_tokens(scores: torch.Tensor) -> torch.Tensor:
            tokens = scores[:, drop:].clone()
            if cls and drop == 0:  # "full" keeps the CLS feature: always keep it
                tokens[:, 0] = float("inf")
            return tokens

        return VisionScoring(attention, feature_layer, cls, embeddings.num_patches + int(cls) - drop, to_tokens)


@register_adapter
class LlavaNextAdapter(Adapter):
    model_types = ("llava_next",)
    display_name = "LLaVA-NeXT (LlavaNextForConditionalGeneration)"
    downsample_large_grids = False  # OneVision's anyres_max_N pooling

    # -- image inputs: (images, tiles, C, H, W), unused tiles of smaller images padded; sizes per image -------
    pixel_keys = ("pixel_values", "image_sizes")
    image_keys = ("image_sizes",)

    def image_grids(self, inputs: dict[str, Any]) -> list[list[ImageTile]]:
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise SteeringError("the LLaVA-NeXT image grid needs the processor's image_sizes in the inputs")
        sizes = torch.as_tensor(sizes).tolist()
        grids, k = [], 0
        for row in inputs["input_ids"]:
            tiles = []
            for i, (s, e) in enumerate(self.image_runs(row)):
                tiles += self._anyres_tiles(i, s, e, sizes[k])
                k += 1
            grids.append(tiles)
        return grids

    def _anyres_tiles(self, image: int, start: int, end: int, size: list[int]) -> list[ImageTile]:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        base = ImageTile(image, "base", grid_positions(start, side, side))
        rest = end - start - side * side
        if rest == 1:  # a single crop: base grid plus one newline feature
            return [base]
        rows, cols = self._unpadded_shape(size, side)
        if rows * (cols + 1) != rest:
            raise SteeringError(
                f"LLaVA-NeXT image {image}: expected {rows}x({cols}+1) tile tokens after the base grid, "
                f"found {rest}; the adapter's anyres arithmetic does not match this transformers version"
            )
        tiles = ImageTile(image, "tile", grid_positions(start + side * side, rows, cols, row_stride=cols + 1))
        return [base, tiles]

    def _unpadded_shape(self, size: list[int], side: int) -> tuple[int, int]:
        """Rows and columns of the stitched tile grid, computed with the model module's own anyres helpers."""
        module = sys.modules[type(self.model.model).__module__]
        n_rows, n_cols = module.get_anyres_image_grid_shape(
            size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        grid = module.unpad_image(torch.zeros(1, n_rows * side, n_cols * side), torch.tensor(size))
        rows, cols = grid.shape[1], grid.shape[2]
        if self.downsample_large_grids:
            max_tiles = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
            ratio = math.sqrt(rows * cols / (max_tiles * side**2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    multi_image = True
    display_name = "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)"
    downsample_large_grids = True
    pixel_keys = ("pixel_values", "image_sizes", "batch_num_images")  # image inputs: images per row too
