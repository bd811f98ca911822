"""Idefics3 and SmolVLM: split images as tiles, each ``<fake_token_around_image><tag><image>*n``.

A split image is ``rows x cols`` crops, each tagged ``<row_i_col_j>``, with a newline after each row of
crops, then the global (downscaled) image tagged ``<global-img>``, and a closing
``<fake_token_around_image>``. An unsplit image is just the global part. The layout is read from the ids
alone: the two tokens before each run are the fake token and the tag, the global run closes an image, and
the image's span runs from the first run's fake token to the fake token after its global run.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lvlm_steer.adapters.base import NO_CLS, Adapter, ImageTile, Span, VisionScoring, _square_tile
from lvlm_steer.adapters.registry import register_adapter

_TAG = re.compile(r"<row_(\d+)_col_(\d+)>")


@register_adapter
class Idefics3Adapter(Adapter):
    model_types = ("idefics3",)
    multi_image = True
    display_name = "Idefics3 (Idefics3ForConditionalGeneration)"
    vision_scoring_kind = NO_CLS
    layers_path = "model.text_model.layers"
    vision_path = "model.vision_model"

    # -- image inputs: (row, image slot) crops of each row's images, all-zero padding slots after them --------
    pixel_keys = ("pixel_values", "pixel_attention_mask")
    slot_keys = ("pixel_attention_mask",)

    def _pixel_slots(self, inputs: dict[str, Any]) -> list[tuple]:
        slots = []
        for b, row in enumerate(inputs["input_ids"]):
            start = 0
            for runs in self._images(row):  # one run per crop, the global image last
                slots.append((b, slice(start, start + len(runs))))
                start += len(runs)
        return slots

    def _images(self, row: torch.Tensor) -> list[list[Span]]:
        """Runs grouped per image: an image ends with the run tagged like the row's last run (the global tag)."""
        runs = self.image_runs(row)
        if not runs:
            return []
        global_tag = int(row[runs[-1][0] - 1])
        images, current = [], []
        for s, e in runs:
            current.append((s, e))
            if int(row[s - 1]) == global_tag:
                images.append(current)
                current = []
        if current:
            images.append(current)
        return images

    def image_spans(self, row: torch.Tensor) -> list[Span]:
        n = row.shape[0]
        return [(max(0, runs[0][0] - 2), min(n, runs[-1][1] + 1)) for runs in self._images(row)]

    def image_tiles(self, row: torch.Tensor, inputs: dict[str, Any], row_index: int) -> list[ImageTile]:
        tiles = []
        for i, runs in enumerate(self._images(row)):
            for k, (s, e) in enumerate(runs):
                is_global = k == len(runs) - 1
                tile = _square_tile(i, "global" if is_global else "tile", s, e)
                if not is_global:
                    tile.tile_row, tile.tile_col = self._tag_position(int(row[s - 1]))
                tiles.append(tile)
        return tiles

    def vision_scoring(self) -> VisionScoring:
        """SigLIP tower (no CLS) on each crop; the connector's pixel shuffle folds scale^2 patches into a token."""
        tower = self.vision_tower()
        layers = tower.encoder.layers
        scale = self.config.scale_factor
        shuffle = self.model.model.connector.pixel_shuffle

        def to_tokens(scores: torch.Tensor) -> torch.Tensor:  # a token's score: the sum over its patches
            return shuffle(scores[..., None], scale).sum(dim=-1)

        tokens = tower.embeddings.num_patches // scale**2
        return VisionScoring([layer.self_attn for layer in layers], len(layers) - 1, False, tokens, to_tokens)

    def _tag_position(self, token_id: int) -> tuple[int | None, int | None]:
        tok = getattr(self.processor, "tokenizer", None)
        if tok is None:
            return None, None
        match = _TAG.fullmatch(tok.convert_ids_to_tokens(token_id) or "")
        return (int(match[1]) - 1, int(match[2]) - 1) if match else (None, None)


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    model_types = ("smolvlm",)
    display_name = "SmolVLM (SmolVLMForConditionalGeneration)"
