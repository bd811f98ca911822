"""What an adapter knows about one architecture, and the defaults most architectures share.

An adapter answers, for a loaded model: where the text decoder layers, their attention modules and
``o_proj`` are; where the vision tower is; which token ids are image tokens; where each image's tokens lie
in a batch row (and which surrounding marker tokens belong to the image but are not image tokens); the
image-token grid (rows x columns per tile); and how to build the text-only variant of a batch. Methods ask
the adapter and never test the architecture themselves.

To support a new architecture: subclass `Adapter`, set `model_types` (the config's ``model_type``) and the
module paths, override `image_spans` / `image_tiles` if its image tokens are not one plain run per image,
and decorate it with `register_adapter`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import nn

from lvlm_steer.adapters.image_inputs import ImageInputsMixin
from lvlm_steer.errors import SteeringError
from lvlm_steer.model_info import ModelInfo

Span = tuple[int, int]  # [start, end) in a batch row
NO_CLS = "SigLIP, no CLS: mean received attention"  # `Adapter.vision_scoring_kind` of CLS-less towers


@dataclass
class ImageTile:
    """A rectangle of one image's tokens: ``positions[r, c]`` is the key slot (column in the batch row) of cell (r, c).

    ``kind`` is "image" for a single-grid image, "tile" for one crop of a split image, "global" for the
    downscaled whole image that split layouts add, or "base" for LLaVA-NeXT's base grid.
    """

    image: int
    kind: str
    positions: torch.Tensor
    tile_row: int | None = None  # where a crop sits in its image's split layout, when the tokens say
    tile_col: int | None = None

    @property
    def rows(self) -> int:
        return int(self.positions.shape[0])

    @property
    def cols(self) -> int:
        return int(self.positions.shape[1])


@dataclass
class VisionScoring:
    """What pruning before the LLM (VTC-CLS) needs from a vision tower; see `Adapter.vision_scoring`.

    A *unit* is one vision-tower input (an image, or one crop of a split image). ``attention`` holds the
    tower's self-attention modules in order (``q_proj``, ``k_proj``, ``num_heads``, ``head_dim``, ``scale``;
    called with the normed hidden states and an optional mask). The LLM sees the output of layer
    ``feature_layer``. ``cls``: position 0 is a CLS token. ``to_tokens`` maps per-position scores
    (units, positions) to scores of the unit's image tokens (units, ``tokens_per_unit``) in LLM order.
    ``project(module, hidden, rows)`` gives one attention module's per-head queries of ``rows`` and all keys.
    """

    attention: list[nn.Module]
    feature_layer: int
    cls: bool
    tokens_per_unit: int
    to_tokens: Callable[[torch.Tensor], torch.Tensor]
    project: Callable[[nn.Module, torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]] = None  # type: ignore

    def __post_init__(self) -> None:
        if self.project is None:
            self.project = head_projections


def head_projections(module: nn.Module, hidden: torch.Tensor, rows: slice, norms: bool = False):
    """Per-head fp32 queries of ``rows`` and all keys, (B, H, q, D) and (B, H, N, D), from the module's own
    ``q_proj`` / ``k_proj`` (``norms``: then its ``q_norm`` / ``k_norm`` over the whole projection, as InternViT)."""
    b, n, _ = hidden.shape
    h, d = module.num_heads, module.head_dim
    q_in = hidden[:, rows]
    q, k = module.q_proj(q_in), module.k_proj(hidden)
    if norms:
        q, k = module.q_norm(q), module.k_norm(k)
    return q.view(b, q_in.shape[1], h, d).transpose(1, 2).float(), k.view(b, n, h, d).transpose(1, 2).float()


class Adapter(ImageInputsMixin):
    """Defaults for the common layout: ``model.language_model.layers``, one run of image tokens per image.

    Image-input methods (`vision_inputs`, `image_inputs`, `with_pixels`, `with_images`) come from
    `ImageInputsMixin` (lvlm_steer/adapters/image_inputs.py).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    display_name: ClassVar[str] = ""
    text_config_key: ClassVar[str] = "text_config"
    layers_path: ClassVar[str] = "model.language_model.layers"
    vision_path: ClassVar[str] = "model.vision_tower"
    # tokens right before / after each run of image tokens that belong to the image (markers, not image tokens)
    markers_before: ClassVar[int] = 0
    markers_after: ClassVar[int] = 0
    # per-token inputs (same shape as input_ids) that the text-only variant slices like input_ids
    token_inputs: ClassVar[tuple[str, ...]] = ("token_type_ids", "mm_token_type_ids")
    # model attributes that a forward overwrites and a second stream must not clobber (dotted paths)
    stateful_attributes: ClassVar[tuple[str, ...]] = ()
    # the per-token input value of generated tokens (PaliGemma marks its causal suffix with token type 1)
    generated_token_type: ClassVar[int] = 0
    # decode positions are plain 1-D position ids, so rows at different lengths can be decoded side by side
    # (False: Qwen-VL's 3-D mrope positions, which the model derives from its own state)
    plain_position_ids: ClassVar[bool] = True
    # the prompt attends bidirectionally (prefix-LM), so a prompt prefix's cache depends on the tokens after it
    bidirectional_prompt: ClassVar[bool] = False
    # trained on prompts with several images (CARVE's final pass then shows the original and the refined image)
    multi_image: ClassVar[bool] = False
    # what `vision_scoring` scores tower tokens by, for refusals that list the supported architectures
    # ("" where the adapter has no vision_scoring)
    vision_scoring_kind: ClassVar[str] = ""

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        self.model = model
        self.processor = processor
        self.config = model.config

    # -- modules ------------------------------------------------------------------------------------------
    @cached_property
    def text_config(self):
        return getattr(self.config, self.text_config_key)

    @cached_property
    def info(self) -> ModelInfo:
        return ModelInfo.from_text_config(self.config.model_type, self.text_config)

    def layers(self) -> list[nn.Module]:
        """The text decoder layers, in order."""
        layers = _resolve(self.model, self.layers_path)
        if layers is None:
            raise SteeringError(
                f"{type(self.model).__name__} has no {self.layers_path!r}; this transformers version moved the "
                f"decoder layers: update {type(self).__name__}.layers_path"
            )
        return list(layers)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers()]

    def o_proj(self, layer: int) -> nn.Module:
        return self.attention_modules()[layer].o_proj

    def vision_tower(self) -> nn.Module:
        tower = _resolve(self.model, self.vision_path)
        if tower is None:
            raise SteeringError(f"{type(self.model).__name__} has no vision tower at {self.vision_path!r}")
        return tower

    def vision_scoring(self) -> VisionScoring | None:
        """The vision tower's attention modules and token layout for pre-LLM pruning; None where unsupported."""
        return None

    @contextlib.contextmanager
    def isolated_state(self, stream_state: dict[str, Any] | None = None) -> Iterator[None]:
        """Keep `stateful_attributes` of an outer stream intact across the block.

        With ``stream_state`` (a dict owned by a second stream), the block sees that stream's own values (set
        on entry, saved back on exit), so two interleaved streams never read each other's state.
        """
        slots = []
        for path in self.stateful_attributes:
            owner_path, _, name = path.rpartition(".")
            owner = _resolve(self.model, owner_path) if owner_path else self.model
            if owner is not None and hasattr(owner, name):
                slots.append((path, owner, name, getattr(owner, name)))
        if stream_state is not None:
            for path, owner, name, _ in slots:
                setattr(owner, name, stream_state.get(path))
        try:
            yield
        finally:
            for path, owner, name, outer in slots:
                if stream_state is not None:
                    stream_state[path] = getattr(owner, name)
                setattr(owner, name, outer)

    # -- tokens ---------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def pad_token_id(self) -> int:
        tok = getattr(self.processor, "tokenizer", None)
        for candidate in (getattr(tok, "pad_token_id", None), getattr(self.text_config, "pad_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) True at image tokens (features of the vision tower, newline features included)."""
        return input_ids == self.image_token_id

    def image_runs(self, row: torch.Tensor) -> list[Span]:
        """Maximal runs of consecutive image tokens in one row of input ids."""
        return _runs(row == self.image_token_id)

    def image_spans(self, row: torch.Tensor) -> list[Span]:
        """One [start, end) per image in the row, covering its image tokens and its marker tokens."""
        n = row.shape[0]
        return [(max(0, s - self.markers_before), min(n, e + self.markers_after)) for s, e in self.image_runs(row)]

    def image_tiles(self, row: torch.Tensor, inputs: dict[str, Any], row_index: int) -> list[ImageTile]:
        """The grid(s) of each image in the row; default: each run is one square grid (a leading CLS allowed)."""
        return [_square_tile(i, "image", s, e) for i, (s, e) in enumerate(self.image_runs(row))]

    def image_grids(self, inputs: dict[str, Any]) -> list[list[ImageTile]]:
        """Per batch row, the image-token grids of its images (positions are key slots of the padded row)."""
        ids = inputs["input_ids"]
        return [self.image_tiles(ids[b], inputs, b) for b in range(ids.shape[0])]

    # -- text-only variant -----------------------------------------------------------------------------------
    def text_only(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch with every image removed (image and marker tokens dropped, rows re-left-padded).

        Vision inputs are dropped, so the model recomputes positions for the shorter rows itself (Qwen2-VL's
        mrope included: without images its positions are plain text positions). Contrast methods run this
        next to the original batch.
        """
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        keep = valid.clone()
        for b in range(ids.shape[0]):
            for s, e in self.image_spans(ids[b]):
                keep[b, s:e] = False
        out = {
            "input_ids": left_pack(ids, keep, self.pad_token_id),
            "attention_mask": left_pack(torch.ones_like(ids), keep, 0),
        }
        for key in self.token_inputs:
            if isinstance(inputs.get(key), torch.Tensor) and inputs[key].shape == ids.shape:
                out[key] = left_pack(inputs[key], keep, 0)
        return out

    def extend_inputs(self, inputs: dict[str, Any], sequences: torch.Tensor) -> dict[str, Any]:
        """Inputs for one uncached forward over prompt + generated tokens (``sequences`` from ``generate``)."""
        ids = inputs["input_ids"]
        new = sequences.shape[1] - ids.shape[1]
        if new < 0 or not torch.equal(sequences[:, : ids.shape[1]], ids):
            raise ValueError("sequences must start with the prompt's input_ids (as generate returns them)")
        out = dict(inputs)
        out["input_ids"] = sequences
        mask = inputs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], new)], dim=1)
        for key in self.token_inputs:
            value = inputs.get(key)
            if isinstance(value, torch.Tensor) and value.shape == ids.shape:
                out[key] = torch.cat([value, value.new_full((value.shape[0], new), self.generated_token_type)], 1)
        return out


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _runs(mask: torch.Tensor) -> list[Span]:
    """[start, end) of each maximal run of True in a 1-D bool tensor."""
    flags = mask.to(torch.int8).cpu()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), flags, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))


def left_pack(values: torch.Tensor, keep: torch.Tensor, pad: int) -> torch.Tensor:
    """Keep ``values[b][keep[b]]`` per row, left-padded with ``pad`` to the longest kept row."""
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = torch.full((values.shape[0], width), pad, dtype=values.dtype, device=values.device)
    for b in range(values.shape[0]):
        kept = values[b][keep[b]]
        if kept.numel():
            out[b, width - kept.shape[0] :] = kept
    return out


def square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def grid_positions(start: int, rows: int, cols: int, row_stride: int | None = None) -> torch.Tensor:
    """Key slots of a rows x cols grid laid out row-major from ``start`` (``row_stride`` skips e.g. newline slots)."""
    stride = cols if row_stride is None else row_stride
    return start + torch.arange(rows)[:, None] * stride + torch.arange(cols)[None, :]


def _square_tile(image: int, kind: str, start: int, end: int) -> ImageTile:
    n = end - start
    side = square_side(n)
    if side is None and square_side(n - 1) is not None:  # a leading CLS feature ("full" feature selection)
        start, side = start + 1, square_side(n - 1)
    if side is None:
        raise SteeringError(f"{n} image tokens do not form a square grid; this layout needs its own adapter")
    return ImageTile(image, kind, grid_positions(start, side, side))
