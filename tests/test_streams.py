"""The auxiliary-stream engine (lvlm_steer.streams) against a slow reference, on left-padded batches of two rows
with different images and prompts.

The reference decodes step by step with two separate unwrapped, uncached forwards per step (the whole prompt plus
the tokens so far, once with the image and once text-only), applies generate's built-in processor (here
``suppress_tokens``) to the main logits, combines by hand and takes the argmax.
"""

from __future__ import annotations

import pytest
import torch
from conftest import _model, batch

import lvlm_steer as ls
from lvlm_steer.errors import MissingImagesError, SteeringError
from lvlm_steer.streams import (
    AuxStream,
    StepScores,
    TextOnly,
    apply_plausibility,
    generate_with_streams,
    neutral_combine,
)
from lvlm_steer.testing import ARCHITECTURES

ARCHS = ["llava", "qwen2_vl", "idefics3"]
STEPS = 8
ALPHA, BETA = 1.0, 0.1
TEXT = AuxStream("text", TextOnly())


def contrast(main: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """The toy rule: VCD's form, (1 + a) l_main - a l_aux, with the plausibility cut at beta."""
    return apply_plausibility((1 + ALPHA) * main.float() - ALPHA * aux, main, BETA)


def contrast_rule(step: StepScores) -> torch.Tensor:
    return contrast(step.main, step.aux["text"])


def _options(model, **extra):
    options = dict(
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        suppress_tokens=[model.config.image_token_id],
        output_scores=True,
        return_dict_in_generate=True,
    )
    return {**options, **extra}


def _run(model, inputs, combine, join, **extra):
    with ls.steer(model) as steering, torch.no_grad():
        out = generate_with_streams(steering, {**inputs, **_options(model, **extra)}, [TEXT], combine, join=join)
    return out.sequences, torch.stack(out.scores, dim=1)


def _suppressed(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [model.config.image_token_id, *eos]


def reference(model, inputs, steps: int = STEPS):
    """Two unwrapped uncached full forwards per step; the toy rule and greedy choice by hand."""
    adapter = ls.adapter_for(model)
    text = adapter.text_only(inputs)
    sequences, scores = inputs["input_ids"], []
    for _ in range(steps):
        generated = sequences[:, inputs["input_ids"].shape[1] :]
        with torch.no_grad():
            main = model(**adapter.extend_inputs(inputs, sequences)).logits[:, -1].float()
            aux_ids = torch.cat([text["input_ids"], generated], dim=1)
            aux = model(**adapter.extend_inputs(text, aux_ids)).logits[:, -1].float()
        main[:, _suppressed(model)] = float("-inf")  # generate's suppress_tokens and min_new_tokens, before the rule
        combined = contrast(main, aux)
        scores.append(combined)
        sequences = torch.cat([sequences, combined.argmax(-1, keepdim=True)], dim=1)
    return sequences, torch.stack(scores, dim=1)


@pytest.mark.parametrize("join", [True, False], ids=["joined", "sequential"])
@pytest.mark.parametrize("arch", ARCHS)
def test_contrast_matches_two_uncached_forwards_per_step(arch, join):
    model, processor = _model(arch)
    inputs = batch(processor)
    seq, scores = _run(model, inputs, contrast_rule, join)
    ref_seq, ref_scores = reference(model, inputs)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
    with torch.no_grad():
        plain = model.generate(**inputs, **_options(model)).sequences
    assert not torch.equal(seq, plain), "the contrast must change the generated text here"
    assert torch.isinf(scores).any() and not torch.isinf(scores).all(-1).any(), "APC cuts some tokens, never all"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_neutral_combine_equals_unwrapped_greedy(arch):
    """Every architecture: both modes decode the streams and still give exactly the unwrapped greedy text."""
    model, processor = _model(arch)
    inputs = batch(processor)
    with torch.no_grad():
        plain = model.generate(**inputs, **_options(model))
    plain_scores = torch.stack(plain.scores, dim=1)
    for join in (True, False):
        seq, scores = _run(model, inputs, neutral_combine, join)
        assert torch.equal(seq, plain.sequences), join
        torch.testing.assert_close(scores, plain_scores, atol=1e-4, rtol=0)
    assert torch.equal(_run(model, inputs, neutral_combine, False)[1], plain_scores), "sequential is bit-exact"


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_joined_equals_sequential_and_sampling_is_reproducible(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    joined, joined_scores = _run(model, inputs, contrast_rule, True)
    sequential, sequential_scores = _run(model, inputs, contrast_rule, False)
    assert torch.equal(joined, sequential)
    torch.testing.assert_close(joined_scores, sequential_scores, atol=1e-4, rtol=0)
    sampling = dict(do_sample=True, temperature=0.7, top_k=20)
    for join in (True, False):
        runs = []
        for _ in range(2):
            torch.manual_seed(1234)
            runs.append(_run(model, inputs, contrast_rule, join, **sampling))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        prompt = inputs["input_ids"].shape[1]
        cut = runs[0][1].isinf()
        assert not cut.gather(-1, runs[0][0][:, prompt:, None]).any(), "sampled tokens pass the plausibility cut"


def test_eos_and_max_length_behave_as_plain_generate():
    """A row that stops early is padded, generation ends when the main rows end, max_length counts the user's prompt."""
    model, processor = _model("llava")
    inputs = batch(processor)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    eos = int(plain.sequences[0, inputs["input_ids"].shape[1] + 2])  # row 0's third token plays EOS
    options = dict(eos_token_id=eos, pad_token_id=0, do_sample=False)
    with torch.no_grad():
        expected = model.generate(**inputs, max_length=inputs["input_ids"].shape[1] + 6, **options)
    for join in (True, False):
        with ls.steer(model) as steering, torch.no_grad():
            got = generate_with_streams(
                steering, {**inputs, "max_length": inputs["input_ids"].shape[1] + 6, **options}, [TEXT],
                neutral_combine, join=join,
            )
        assert torch.equal(got, expected), join


def test_auto_mode_joins_only_when_nothing_edits_the_main_stream():
    model, processor = _model("llava")
    inputs = batch(processor)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        with ls.steer(model) as steering, torch.no_grad():
            generate_with_streams(steering, {**inputs, **_options(model)}, [TEXT], neutral_combine)
        assert set(seen) == {4}, "one forward of 2 main + 2 text rows per step"
        seen.clear()
        with ls.steer(model, ls.ScaleHeads({1: [0]}, gain=2.0)) as steering, torch.no_grad():
            generate_with_streams(steering, {**inputs, **_options(model)}, [TEXT], neutral_combine)
            with pytest.raises(SteeringError, match="cannot run the streams in one forward: scale"):
                generate_with_streams(steering, {**inputs, **_options(model)}, [TEXT], neutral_combine, join=True)
        assert set(seen) == {2} and len(seen) == 2 * STEPS, "main and text stream apart, one forward each per step"
    finally:
        handle.remove()


def test_two_streams_and_head_edits_on_the_main_stream_only():
    """Head edits reach the main rows only: the text stream's logits equal the unwrapped text-only model's."""
    model, processor = _model("qwen2_vl")
    inputs = batch(processor)
    text = ls.adapter_for(model).text_only(inputs)
    with torch.no_grad():
        text_first = model(**text).logits[:, -1]
    seen = {}

    def rule(step):
        seen.setdefault("first", {k: v.clone() for k, v in step.aux.items()})
        return step.main

    streams = [TEXT, AuxStream("again", TextOnly())]
    with ls.steer(model, ls.AblateHeads({0: [0, 1], 1: [2]})) as steering, torch.no_grad():
        edited = model(**inputs).logits[:, -1]
        out = generate_with_streams(steering, {**inputs, **_options(model, min_new_tokens=None)}, streams, rule)
    torch.testing.assert_close(seen["first"]["text"], text_first, atol=1e-5, rtol=0)
    assert torch.equal(seen["first"]["text"], seen["first"]["again"])
    suppressed = edited.clone()
    suppressed[:, model.config.image_token_id] = float("-inf")
    torch.testing.assert_close(out.scores[0], suppressed, atol=1e-5, rtol=0)


def test_bad_input_is_refused_with_the_fix():
    model, processor = _model("llava")
    inputs = batch(processor)
    with ls.steer(model) as steering:
        with pytest.raises(SteeringError, match="not beam search.*num_beams=1"):
            generate_with_streams(steering, {**inputs, "num_beams": 2}, [TEXT], neutral_combine)
        with pytest.raises(SteeringError, match="distinct names"):
            generate_with_streams(steering, dict(inputs), [TEXT, TEXT], neutral_combine)
        right = {k: v.flip(1) if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}
        with pytest.raises(SteeringError, match="padding_side='left'"):
            generate_with_streams(steering, right, [TEXT], neutral_combine)
        bad = AuxStream("bad", lambda adapter, batch: {"input_ids": batch["input_ids"][:1]})
        with pytest.raises(SteeringError, match="one row per main row"):
            generate_with_streams(steering, dict(inputs), [bad], neutral_combine)


def test_method_needing_images_refuses_a_batch_without_them_in_joined_mode():
    model, processor = _model("llava")
    text = ls.adapter_for(model).text_only(batch(processor))
    method = ls.PAI(alpha=0.0, cfg=True)
    steering = ls.steer(model, method)
    with pytest.raises(MissingImagesError, match=r"rows \[0, 1\] contain no image tokens"):
        generate_with_streams(steering, {**text, "max_new_tokens": 2}, [TEXT], neutral_combine, owner=method)
    assert not steering.active
