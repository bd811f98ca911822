"""Image inputs of a batch: which keys carry them, each image's share of them, and the batch with other images.

A method that changes what the model sees (a noised or augmented image for a contrast stream, a refined crop,
pre-encoded features of a pruned image) must not guess tensor names or layouts: ``pixel_values`` is one row per
image for LLaVA, Gemma 3 and PaliGemma, tiles per image for LLaVA-NeXT, crops of all images stacked for InternVL,
(row, image slot) with all-zero padding images for Idefics3 / SmolVLM, and flattened patch rows per image
(``image_grid_thw``) for Qwen-VL. The adapter knows; methods ask it here:

- `vision_inputs` / `without_vision_inputs`: the batch keys that feed the vision tower, or the batch without them;
- `encode_images`: the model's own image encoder on those inputs (what pre-LLM reducers start from);
- `image_inputs`: per image, its slot in ``pixel_values`` (tiles, crops or patch rows), its batch row and its entries
  of the per-image keys (grid, size, pixel mask);
- `with_pixels`: the same batch with a function applied to each image's normalised pixel tensor (same shape);
- `with_images`: the same batch with other PIL images, through the processor, refused with the fix when the new
  images need a different image-token layout than the prompt has.

`ImageInputsMixin` holds the shared logic; each adapter sets `pixel_keys` (and overrides `_pixel_slots` when its
``pixel_values`` is not one entry per image along the first axis).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lvlm_steer.errors import MissingImagesError, SteeringError

Slot = tuple  # an index into pixel_values: (i,), (slice(a, b),) or (row, slice(a, b))


@dataclass
class ImageInputs:
    """A batch's pixel inputs, per image in batch order (row by row, left to right)."""

    keys: tuple[str, ...]  # batch keys that carry vision inputs (pixel_values, grids, sizes, pixel masks)
    pixel_values: torch.Tensor
    slots: list[Slot]  # per image: its index into pixel_values (its tiles, crops or patch rows)
    rows: list[int]  # per image: its batch row
    extras: list[dict[str, torch.Tensor]]  # per image: its entries of the other per-image keys

    def __len__(self) -> int:
        return len(self.slots)

    def pixels(self, image: int) -> torch.Tensor:
        """The normalised pixel tensor of one image (a view into ``pixel_values``)."""
        return self.pixel_values[self.slots[image]]

    def replaced(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """``pixel_values`` with each image's part replaced by ``pixels[i]`` (padding entries kept as they are)."""
        if len(pixels) != len(self.slots):
            raise ValueError(f"{len(pixels)} pixel tensors for {len(self.slots)} images")
        out = self.pixel_values.clone()
        for i, (slot, new) in enumerate(zip(self.slots, pixels, strict=True)):
            old = out[slot]
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(
                    f"image {i}: a pixel transform must keep the shape {tuple(old.shape)}, got {tuple(new.shape)}; "
                    "resize PIL images to the originals' sizes and use with_images instead"
                )
            out[slot] = new.to(out.dtype)
        return out


class ImageInputsMixin:
    """Image-input methods of `Adapter` (mixed in; they use the adapter's token layout and processor)."""

    # batch keys that feed the vision tower (the processor's image outputs); absent keys are skipped
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # per-image keys indexed by the image's number (image_sizes, image_grid_thw)
    image_keys: ClassVar[tuple[str, ...]] = ()
    # per-image keys indexed by the image's pixel slot, like pixel_values (Idefics3's pixel_attention_mask)
    slot_keys: ClassVar[tuple[str, ...]] = ()

    # -- reading ---------------------------------------------------------------------------------------------
    def vision_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``inputs`` that feed the vision tower (what the model's image encoder takes)."""
        return {k: inputs[k] for k in self.pixel_keys if inputs.get(k) is not None}

    def without_vision_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` without the vision-tower entries (e.g. to feed pre-encoded image features instead)."""
        return {k: v for k, v in inputs.items() if k not in self.pixel_keys}

    def encode_images(self, inputs: dict[str, Any], **kwargs: Any) -> Any:
        """The model's own image encoder on the batch's vision inputs (``pooler_output``: LLM-space features)."""
        encoder = self.model.base_model.get_image_features
        params = inspect.signature(encoder).parameters
        vision = {k: v for k, v in self.vision_inputs(inputs).items() if k in params}
        return encoder(**vision, **kwargs, return_dict=True)

    def images_per_row(self, input_ids: torch.Tensor) -> list[int]:
        """Images in each batch row, counted from the image tokens."""
        return [len(self.image_spans(row)) for row in input_ids]

    def image_inputs(self, inputs: dict[str, Any]) -> ImageInputs:
        """Each image's share of the batch's pixel inputs; a clear error when the batch has none."""
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            raise MissingImagesError("this batch has no pixel_values: build it with the processor and images")
        ids = inputs.get("input_ids")
        if ids is None:
            raise SteeringError("reading a batch's images needs its input_ids (to count the images per row)")
        slots = self._pixel_slots(inputs)
        per_row = self.images_per_row(ids)
        rows = [b for b, n in enumerate(per_row) for _ in range(n)]
        if len(slots) != len(rows):
            raise SteeringError(
                f"the batch has {len(rows)} images in its input_ids but pixel_values holds {len(slots)}; "
                f"this layout needs its own {type(self).__name__}._pixel_slots"
            )
        extras = []
        for i, slot in enumerate(slots):
            extra = {k: torch.as_tensor(inputs[k])[i] for k in self.image_keys if inputs.get(k) is not None}
            extra |= {k: inputs[k][slot] for k in self.slot_keys if inputs.get(k) is not None}
            extras.append(extra)
        return ImageInputs(tuple(self.vision_inputs(inputs)), pixel_values, slots, rows, extras)

    def _pixel_slots(self, inputs: dict[str, Any]) -> list[Slot]:
        """Default: ``pixel_values`` holds one entry (an image, or an image's tiles) per image along axis 0."""
        return [(i,) for i in range(inputs["pixel_values"].shape[0])]

    # -- rebuilding ------------------------------------------------------------------------------------------
    def with_pixels(self, inputs: dict[str, Any], fn: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[str, Any]:
        """The batch with ``fn(pixels, image_index)`` applied to each image's normalised pixel tensor.

        ``fn`` must return a tensor of the same shape (noise, masking, a flip of same-sized tiles). Entries of
        ``pixel_values`` that belong to no image (Idefics3's all-zero padding images, which the model detects by
        being zero) stay untouched; an image's own entry may hold padding too (LLaVA-NeXT pads every image to the
        batch's most tiles; the model drops those by ``image_sizes``). Token inputs are shared with ``inputs``.
        """
        images = self.image_inputs(inputs)
        new = [fn(images.pixels(i), i) for i in range(len(images))]
        return dict(inputs) | {"pixel_values": images.replaced(new)}

    def with_images(self, inputs: dict[str, Any], images: Sequence[Any]) -> dict[str, Any]:
        """The batch with other PIL images (one per row, or a list per row), pixels made by the processor.

        The prompt stays as it is, so the new images must need the same image tokens as the old ones (same
        processed size: flips, noise, masks, crops resized back); then the result equals re-running the
        processor on the prompt with the new images. Otherwise the error says which image differs.
        """
        if self.processor is None:
            raise SteeringError("with_images needs the processor: pass steer(model, ..., processor=processor)")
        ids = inputs["input_ids"]
        per_row = self.images_per_row(ids)
        grouped = _group_per_row(images, per_row)
        prompts = [_image_only_prompt(self.processor, len(group)) for group in grouped]
        enc = dict(self.processor(images=grouped, text=prompts, padding=True, padding_side="left", return_tensors="pt"))
        for b in range(ids.shape[0]):
            old, new = self._image_segments(ids[b]), self._image_segments(enc["input_ids"][b])
            for i, (o, n) in enumerate(zip(old, new, strict=True)):
                if not torch.equal(o, n.to(o.device)):
                    raise SteeringError(
                        f"with_images: image {i} of row {b} needs {int((n == self.image_token_id).sum())} image tokens "
                        f"but the prompt holds {int((o == self.image_token_id).sum())} in another layout; give images "
                        "of the original sizes, or run the processor on the prompt text with the new images"
                    )
        device = ids.device
        new_vision = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.vision_inputs(enc).items()}
        old_pixels = inputs.get("pixel_values")
        if old_pixels is not None and "pixel_values" in new_vision:
            new_vision["pixel_values"] = new_vision["pixel_values"].to(old_pixels.dtype)
        return self.without_vision_inputs(inputs) | new_vision

    def _image_segments(self, row: torch.Tensor) -> list[torch.Tensor]:
        """The tokens of each image's span (image tokens with their markers and tags), in order."""
        return [row[s:e] for s, e in self.image_spans(row)]


def _group_per_row(images: Sequence[Any], per_row: list[int]) -> list[list[Any]]:
    """``images`` as one list per row: given per row (an image or a list), or flat in batch order."""
    images = list(images)
    nested = len(images) == len(per_row) and all(
        isinstance(im, (list, tuple)) or n == 1 for im, n in zip(images, per_row, strict=True)
    )
    if nested:
        grouped = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    elif len(images) == sum(per_row):
        starts = [sum(per_row[:b]) for b in range(len(per_row))]
        grouped = [images[s : s + n] for s, n in zip(starts, per_row, strict=True)]
    else:
        raise SteeringError(f"with_images: {len(images)} images for rows holding {per_row} images")
    for b, (group, n) in enumerate(zip(grouped, per_row, strict=True)):
        if len(group) != n:
            raise SteeringError(f"with_images: row {b} holds {n} images, got {len(group)}")
    return grouped


def _image_only_prompt(processor: Any, n_images: int) -> str:
    """A prompt with ``n_images`` image placeholders and no text, in the processor's own chat format."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(n_images)]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=False)
    return processor.image_token * n_images
