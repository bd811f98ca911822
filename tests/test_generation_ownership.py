"""Generation ownership per instance, and one behaviour under plain ``model.generate`` for every method that
needs ``steered.generate``: the core's error naming ``steered.generate(...)``."""

from __future__ import annotations

import pytest
import torch
from conftest import _model, batch, logits

import lvlm_steer as ls
from lvlm_steer.testing import make_image

GREEDY = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False)
NEEDS_STEERED = r"call steered\.generate\(\*\*inputs"


def test_pai_without_cfg_does_not_drive_generation_and_composes_with_vtc_cls():
    assert not ls.PAI(cfg=False).drives_generation() and not ls.PAI(cfg=False).needs_steered_generate()
    assert ls.PAI(cfg=True).drives_generation() and ls.PAI(cfg=True).needs_steered_generate()
    model, processor = _model("llava")
    inputs = batch(processor)
    greedy = GREEDY | {"suppress_tokens": [model.config.image_token_id]}
    pruner = ls.VTCCLS(keep=4, start_layer=0)
    with ls.steer(model, pruner) as steered:
        pruned_only = steered.generate(**inputs, **greedy)
    with ls.steer(model, ls.PAI(alpha=0.8, start_layer=1), pruner) as steered:  # refused before: both drove
        both = steered.generate(**inputs, **greedy)
    assert both.shape == pruned_only.shape == (2, inputs["input_ids"].shape[1] + 2)
    assert torch.equal(both[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert pruner.selection is not None and max(pruner.selection.pruned) < max(pruner.selection.unpruned)


def test_pai_without_cfg_under_plain_model_generate_still_edits():
    model, processor = _model("llava")
    inputs = batch(processor)
    greedy = GREEDY | {"output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        base = model.generate(**inputs, **greedy)
    with ls.steer(model, ls.PAI(alpha=0.8, start_layer=1)) as steered, torch.no_grad():
        plain = model.generate(**inputs, **greedy)
        through_handle = steered.generate(**inputs, **greedy)
    torch.testing.assert_close(torch.stack(plain.scores), torch.stack(through_handle.scores))
    assert not torch.allclose(torch.stack(plain.scores), torch.stack(base.scores))


def test_pai_cfg_refuses_plain_generate_and_forward():
    model, processor = _model("llava")
    inputs = batch(processor)
    with ls.steer(model, ls.PAI(alpha=0.5, start_layer=1, cfg=True, gamma=2.0)) as steered:
        with pytest.raises(ls.SteeringError, match=rf"pai:.*{NEEDS_STEERED}"), torch.no_grad():
            model.generate(**inputs, **GREEDY)
        with pytest.raises(ls.SteeringError, match=NEEDS_STEERED):
            logits(model, inputs)
        out = steered.generate(**inputs, **GREEDY)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_carve_refuses_plain_generate_and_forward_but_runs_its_own():
    model, processor = _model("llava")
    inputs = batch(processor)
    carve = ls.CARVE(layers=(1, 2), max_steps=2)
    with ls.steer(model, carve, processor=processor) as steered:
        with pytest.raises(ls.SteeringError, match=rf"carve.*{NEEDS_STEERED}"), torch.no_grad():
            model.generate(**inputs, **GREEDY)
        with pytest.raises(ls.SteeringError, match=NEEDS_STEERED):
            logits(model, inputs)
        images = [make_image(0, (64, 48)), make_image(1, (40, 56))]
        out = steered.generate(**inputs, images=images, questions=["What is it?", "Describe it."], **GREEDY)
        assert carve.refine(steered, images[0], "What is it?").image.size == images[0].size  # its own forwards
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_vtc_cls_refuses_plain_generate_with_the_same_fix():
    model, processor = _model("llava")
    inputs = batch(processor)
    steered = ls.steer(model, ls.VTCCLS(keep=4, start_layer=0))
    with pytest.raises(ls.SteeringError, match=NEEDS_STEERED), torch.no_grad():
        model.generate(**inputs, **GREEDY)
    assert not steered.active
    with ls.steer(model, ls.VTCCLS(keep=4, start_layer=0)) as steered:
        out = steered.generate(**inputs, **GREEDY)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
