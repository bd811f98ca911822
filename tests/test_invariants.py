"""Invariants every architecture must keep: neutral == unwrapped, removal leaves no trace, batch == rows,
cached == uncached, and head ablation == zeroing o_proj columns."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, greedy_with_logits, logits, our_hooks

import lvlm_steer as ls
from lvlm_steer.attention import _ROUTES

ATOL = 1e-5
# fp32 batched vs single-row matmuls differ by up to 1.05e-5 on these models' logits (|x| ~ 5) even without
# steering (measured on internvl), so row comparisons allow a relative 1e-5 on top of the absolute 1e-5.
RTOL = 1e-5


def test_no_method_and_unit_gain_are_identical(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    ref = logits(model, inputs)
    with ls.steer(model, processor=processor):
        assert torch.equal(logits(model, inputs), ref)
    with ls.steer(model, ls.ScaleHeads({0: {0: 1.0, 3: 1.0}, 1: {2: 1.0}}), processor=processor):
        assert torch.equal(logits(model, inputs), ref)


def test_effective_setting_changes_logits(model_and_processor):
    """Guards the other tests: an effective setting must visibly change the output."""
    model, processor = model_and_processor
    inputs = batch(processor)
    ref = logits(model, inputs)
    for method in (ls.AblateHeads({0: [0, 1], 1: [2]}), ls.ScaleHeads({1: [0, 3]}, gain=3.0)):
        with ls.steer(model, method):
            assert (logits(model, inputs) - ref).abs().max() > 1e-3, method


def _assert_clean(model, hooks_before, impl_before):
    assert our_hooks(model) == hooks_before
    assert not any(m in _ROUTES for m in model.modules())
    assert model.config.get_text_config()._attn_implementation == impl_before


def test_removal_leaves_no_trace(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    ref = logits(model, inputs)
    hooks, impl = our_hooks(model), model.config.get_text_config()._attn_implementation
    vision_impl = {n: c._attn_implementation for n, c in _sub_configs(model)}

    handle = ls.steer(model, ls.AblateHeads({0: [1]}, mode="mean"), ls.ScaleHeads({1: {2: 2.0}}))
    assert handle.active and model.config.get_text_config()._attn_implementation.startswith("lvlmsteer")
    assert {n: c._attn_implementation for n, c in _sub_configs(model) if n != "text_config"} == {
        n: v for n, v in vision_impl.items() if n != "text_config"
    }, "only the text model may switch attention implementation"
    logits(model, inputs)
    handle.remove()
    handle.remove()  # idempotent
    _assert_clean(model, hooks, impl)
    assert torch.equal(logits(model, inputs), ref)

    with pytest.raises(RuntimeError, match="boom"):
        with ls.steer(model, ls.AblateHeads({1: [0]})):
            logits(model, inputs)
            raise RuntimeError("boom")
    _assert_clean(model, hooks, impl)
    assert torch.equal(logits(model, inputs), ref)


def _sub_configs(model):
    return [(key, getattr(model.config, key)) for key in model.config.sub_configs if getattr(model.config, key, None)]


@pytest.mark.parametrize("methods", ["none", "ablate+scale"])
def test_batch_rows_equal_single_rows(model_and_processor, methods):
    model, processor = model_and_processor
    chosen = [] if methods == "none" else [ls.AblateHeads({0: [1], 2: [0]}, mode="mean"), ls.ScaleHeads({1: [3]})]
    both = batch(processor, (0, 1))
    with ls.steer(model, *chosen):
        batched = logits(model, both)
        for row in (0, 1):
            single = logits(model, batch(processor, (row,)))
            n = single.shape[1]  # left padding: the row's tokens are the last n of the batch row
            torch.testing.assert_close(batched[row, -n:], single[0], atol=ATOL, rtol=RTOL)


def _image_token_ids(model) -> list[int]:
    cfg = model.config
    ids = {cfg.image_token_id}
    for key in ("video_token_id", "vision_start_token_id", "vision_end_token_id", "boi_token_id", "eoi_token_id"):
        if getattr(cfg, key, None) is not None:
            ids.add(int(getattr(cfg, key)))
    return sorted(ids)


def test_cached_generate_equals_uncached_reforward(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    steps = 4
    with ls.steer(model, ls.AblateHeads({0: [1]}, mode="mean"), ls.ScaleHeads({1: [0, 2]}, gain=1.5)):
        with torch.no_grad():
            seq, step_logits = greedy_with_logits(model, inputs, steps, _image_token_ids(model))
            full = ls.adapter_for(model).extend_inputs(inputs, seq)
            again = model(**full, use_cache=False).logits
    prompt_len = inputs["input_ids"].shape[1]
    uncached = again[:, prompt_len - 1 : prompt_len - 1 + steps]
    torch.testing.assert_close(step_logits, uncached, atol=1e-4, rtol=0)


def test_ablation_equals_zeroed_o_proj_columns(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    heads = {0: [1, 3], 1: [0]}
    with ls.steer(model, ls.AblateHeads(heads)) as steered:
        ours = logits(model, inputs)
        adapter, d = steered.adapter, steered.info.head_dim
    reference = copy.deepcopy(model)
    ref_adapter = ls.adapter_for(reference)
    with torch.no_grad():
        for layer, hs in heads.items():
            weight = ref_adapter.o_proj(layer).weight
            for h in hs:
                weight[:, h * d : (h + 1) * d] = 0
    torch.testing.assert_close(ours, logits(reference, inputs), atol=ATOL, rtol=0)
    assert adapter.model is model


def test_context_records_image_slots(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    with ls.steer(model, processor=processor) as steered:
        logits(model, inputs)
        ctx = steered.context
        assert ctx.phase == "prefill"
        expected = inputs["input_ids"] == model.config.image_token_id
        assert torch.equal(ctx.key_image_mask, expected)
        assert torch.equal(ctx.key_valid_mask, inputs["attention_mask"].bool())
        for row, positions in enumerate(ctx.image_positions()):
            assert torch.equal(positions, expected[row].nonzero().flatten())


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3", "idefics3"])
def test_eager_base_is_kept_and_restored(arch):
    """A model loaded with eager attention is steered on top of eager (not sdpa) and gets eager back."""
    from conftest import _model

    model, processor = _model(arch)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    inputs = batch(processor)
    ref = logits(eager, inputs)
    with ls.steer(eager, processor=processor) as steered:
        assert steered.model.config.get_text_config()._attn_implementation == "lvlmsteer_eager"
        assert torch.equal(logits(eager, inputs), ref)
    assert eager.config.get_text_config()._attn_implementation == "eager"
    assert torch.equal(logits(eager, inputs), ref)
    valid = inputs["attention_mask"].bool()  # padding rows are fully masked: eager and sdpa fill them differently
    with ls.steer(eager, ls.AblateHeads({0: [1]})), ls.steer(model, ls.AblateHeads({0: [1]})):
        torch.testing.assert_close(logits(eager, inputs)[valid], logits(model, inputs)[valid], atol=ATOL, rtol=RTOL)


def test_handle_generate_runs_under_the_steering(model_and_processor):
    model, processor = model_and_processor
    inputs = batch(processor)
    kwargs = dict(max_new_tokens=3, do_sample=False, suppress_tokens=_image_token_ids(model))
    with ls.steer(model, ls.ScaleHeads({1: [0, 1]}, gain=4.0)) as steered:
        via_handle = steered.generate(**inputs, **kwargs)
        direct = model.generate(**inputs, **kwargs)
    assert torch.equal(via_handle, direct)
    with pytest.raises(RuntimeError, match="removed"):
        steered.generate(**inputs, **kwargs)
