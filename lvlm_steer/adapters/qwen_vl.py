"""Qwen2-VL and Qwen2.5-VL: ``<|vision_start|>`` + merged image tokens + ``<|vision_end|>`` per image.

The grid of each image is ``image_grid_thw`` (in patches) divided by the spatial merge size; positions use
3-D mrope, which the model recomputes itself for the text-only variant (no images: plain text positions).
"""

from __future__ import annotations

from typing import Any

import torch

from lvlm_steer.adapters.base import Adapter, ImageTile, grid_positions
from lvlm_steer.adapters.registry import register_adapter
from lvlm_steer.errors import SteeringError


@register_adapter
class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    multi_image = True
    plain_position_ids = False
    display_name = "Qwen2-VL (Qwen2VLForConditionalGeneration)"
    vision_path = "model.visual"
    markers_before = 1  # <|vision_start|>
    markers_after = 1  # <|vision_end|>
    stateful_attributes = ("model.rope_deltas",)  # mrope offsets cached at prefill, read at every decode step

    # -- image inputs: flattened patch rows of all images, t*h*w rows per image (image_grid_thw) --------------
    pixel_keys = ("pixel_values", "image_grid_thw")
    image_keys = ("image_grid_thw",)

    def _pixel_slots(self, inputs: dict[str, Any]) -> list[tuple]:
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise SteeringError("Qwen-VL pixel_values need the processor's image_grid_thw in the inputs")
        counts = torch.as_tensor(thw).prod(dim=1).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [(slice(s, s + n),) for s, n in zip(starts, counts, strict=True)]

    def image_grids(self, inputs: dict[str, Any]) -> list[list[ImageTile]]:
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise SteeringError("the Qwen-VL image grid needs the processor's image_grid_thw in the inputs")
        thw = torch.as_tensor(thw).tolist()
        merge = self.config.vision_config.spatial_merge_size
        grids, k = [], 0
        for row in inputs["input_ids"]:
            tiles = []
            for i, (s, e) in enumerate(self.image_runs(row)):
                t, h, w = thw[k]
                rows, cols = h // merge, w // merge
                if t * rows * cols != e - s:
                    raise SteeringError(f"Qwen-VL image {i}: grid {t}x{rows}x{cols} does not match {e - s} tokens")
                tiles.append(ImageTile(i, "image", grid_positions(s, rows, cols)))
                k += 1
            grids.append(tiles)
        return grids


@register_adapter
class Qwen25VLAdapter(Qwen2VLAdapter):
    model_types = ("qwen2_5_vl",)
    display_name = "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)"
