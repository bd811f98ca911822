"""Image inputs through the adapter on every architecture: which keys feed the vision tower, each image's share
of the pixel tensor, and the same batch with a pixel transform or with other images (via the processor)."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZES, _model, batch, logits

import lvlm_steer as ls
from lvlm_steer.testing import ARCHITECTURES, make_image

TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vision_keys_and_per_image_pixels(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    adapter = ls.adapter_for(model, processor)
    assert set(adapter.vision_inputs(inputs)) == set(inputs) - TEXT_KEYS
    assert set(adapter.without_vision_inputs(inputs)) == set(inputs) & TEXT_KEYS
    images = adapter.image_inputs(inputs)
    assert len(images) == 2 and images.rows == [0, 1]
    marked = torch.zeros_like(inputs["pixel_values"], dtype=torch.bool)
    for i in range(len(images)):
        part = images.pixels(i)
        assert part.numel() > 0 and not marked[images.slots[i]].any(), "images do not overlap"
        marked[images.slots[i]] = True
    unowned = inputs["pixel_values"][~marked]
    assert unowned.numel() == 0 or unowned.eq(0).all(), "only padding belongs to no image"
    for key in adapter.image_keys + adapter.slot_keys:
        assert all(key in extra for extra in images.extras)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_identity_transform_is_the_batch_and_noise_changes_the_output(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    adapter = ls.adapter_for(model, processor)
    base = logits(model, inputs)
    same = adapter.with_pixels(inputs, lambda pixels, i: pixels.clone())
    assert {k: tuple(v.shape) for k, v in same.items()} == {k: tuple(v.shape) for k, v in inputs.items()}
    assert torch.equal(logits(model, same), base)
    gen = torch.Generator().manual_seed(0)
    noised = adapter.with_pixels(inputs, lambda pixels, i: pixels + torch.randn(pixels.shape, generator=gen))
    assert noised["pixel_values"].shape == inputs["pixel_values"].shape
    assert torch.equal(noised["input_ids"], inputs["input_ids"])
    assert (logits(model, noised)[:, -1] - base[:, -1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="keep the shape"):
        adapter.with_pixels(inputs, lambda pixels, i: pixels[..., :1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_with_images_rebuilds_the_batch_through_the_processor(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    adapter = ls.adapter_for(model, processor)
    own = [make_image(seed=r, size=IMAGE_SIZES[r]) for r in (0, 1)]
    again = adapter.with_images(inputs, own)
    for key, value in inputs.items():
        assert torch.equal(again[key], value), key
    other = adapter.with_images(inputs, [make_image(seed=7 + r, size=IMAGE_SIZES[r]) for r in (0, 1)])
    assert {k: tuple(v.shape) for k, v in other.items()} == {k: tuple(v.shape) for k, v in inputs.items()}
    assert not torch.equal(other["pixel_values"], inputs["pixel_values"])
    assert (logits(model, other)[:, -1] - logits(model, inputs)[:, -1]).abs().max() > 1e-4


def test_with_images_refuses_a_different_token_layout_and_needs_the_processor():
    model, processor = _model("qwen2_vl")
    inputs = batch(processor)
    adapter = ls.adapter_for(model, processor)
    with pytest.raises(ls.SteeringError, match="image 0 of row 0 needs .* original sizes"):
        adapter.with_images(inputs, [make_image(0, (112, 112)), make_image(1, IMAGE_SIZES[1])])
    with pytest.raises(ls.SteeringError, match="rows holding"):
        adapter.with_images(inputs, [make_image(0)])
    with pytest.raises(ls.SteeringError, match="processor"):
        ls.adapter_for(model).with_images(inputs, [make_image(0), make_image(1)])
    with pytest.raises(ls.MissingImagesError):
        adapter.image_inputs(adapter.text_only(inputs))
