"""VHR (vision-aware head reinforcement) against a slow reference written from the paper's Algorithm 1.

The reference runs, for each target layer in order, the with-image and the text-only prompt as two separate
forwards of the unwrapped model with the gains chosen so far (plain torch hooks on ``o_proj``), reads the last-
position head outputs of that layer, zeroes the outliers and picks the heads above the median with plain
Python statistics. The fast path does all of it inside one forward of the image batch (replaying each decoder
layer on the text-only stream) and then decodes from the cache.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import _model, batch, greedy_with_logits, logits, our_hooks

import lvlm_steer as ls
from lvlm_steer.errors import MethodConfigError, MethodSpecError, MissingImagesError
from lvlm_steer.hooks.vhr import default_layers, parse_layers, select_heads
from lvlm_steer.steering import _ACTIVE
from lvlm_steer.testing import ARCHITECTURES

ARCHS = ["llava", "qwen2_vl"]
ATOL = RTOL = 1e-5
STEPS = 4


# -- the slow reference -------------------------------------------------------------------------------------
def _run(model, inputs, gains: dict[int, torch.Tensor], record: int | None = None):
    """Unwrapped forward with per-row head gains before ``o_proj``; also the raw last-position heads of ``record``."""
    adapter = ls.adapter_for(model)
    info = adapter.info
    seen: dict[str, torch.Tensor] = {}

    def hook(layer: int):
        def pre(module, args):
            x = args[0].reshape(args[0].shape[0], args[0].shape[1], info.num_heads, info.head_dim)
            if layer == record:
                seen["heads"] = x[:, -1].detach().clone()
            if layer in gains:
                x = x * gains[layer][:, None, :, None].to(x.dtype)
            return (x.reshape(args[0].shape), *args[1:])

        return pre

    layers = set(gains) | ({record} if record is not None else set())
    handles = [adapter.o_proj(layer).register_forward_pre_hook(hook(layer)) for layer in layers]
    try:
        with torch.no_grad():
            out = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return out, seen.get("heads")


def _reference_choice(with_image: torch.Tensor, text_only: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 4, 6, 7 for one row of one layer, with plain Python statistics: (H,) gains."""
    vhd = [float((a - t).norm()) for a, t in zip(with_image, text_only, strict=True)]
    ta = [float(t.pow(2).sum()) for t in text_only]
    vhd_cut = statistics.mean(vhd) + statistics.stdev(vhd)
    ta_cut = statistics.mean(ta) + statistics.stdev(ta)
    vhd = [0.0 if v > vhd_cut and t > ta_cut else v for v, t in zip(vhd, ta, strict=True)]
    median = sorted(vhd)[(len(vhd) - 1) // 2]
    return torch.tensor([alpha if v > median else 1.0 for v in vhd])


def reference_gains(model, inputs, layers, alpha: float = 2.0) -> dict[int, torch.Tensor]:
    """Algorithm 1: layer by layer, two separate forwards with the gains chosen so far, then choose this layer's."""
    text = ls.adapter_for(model).text_only(inputs)
    gains: dict[int, torch.Tensor] = {}
    for layer in layers:
        _, with_image = _run(model, inputs, gains, record=layer)
        _, text_only = _run(model, text, gains, record=layer)
        gains[layer] = torch.stack([_reference_choice(a, t, alpha) for a, t in zip(with_image, text_only, strict=True)])
    return gains


def _heads(gains: dict[int, torch.Tensor]) -> list[dict[int, tuple[int, ...]]]:
    rows = next(iter(gains.values())).shape[0]
    return [{layer: tuple((g[b] != 1).nonzero().flatten().tolist()) for layer, g in gains.items()} for b in range(rows)]


def _generate(steering, inputs, model):
    kwargs = dict(
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        suppress_tokens=[model.config.image_token_id],
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = steering.generate(**inputs, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


# -- fast path == reference -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_reference(arch):
    """Same heads per row, same logits; layers 0, 1, 2 so that later choices depend on earlier reinforcement."""
    model, processor = _model(arch)
    inputs = batch(processor)
    layers = (0, 1, 2)
    vhr = ls.VHR(alpha=2.0, layers=layers)
    with ls.steer(model, vhr):
        fast = logits(model, inputs)
    gains = reference_gains(model, inputs, layers)
    ref, _ = _run(model, inputs, gains)
    valid = inputs["attention_mask"].bool()
    assert vhr.heads() == _heads(gains)
    assert vhr.heads()[0] != vhr.heads()[1], "rows with different images should get their own heads here"
    assert (fast - logits(model, inputs))[valid].abs().max() > 1e-3, "reinforcement must change the logits"
    torch.testing.assert_close(fast[valid], ref[valid], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_matches_uncached_reforward(arch):
    """Heads chosen at the first step are kept: every step's logits equal one uncached forward with those heads."""
    model, processor = _model(arch)
    inputs = batch(processor)
    vhr = ls.VHR()  # default layers: 1 plus the last 44% (here 1, 2 of 3)
    with ls.steer(model, vhr) as steered:
        sequences, steps = _generate(steered, inputs, model)
        chosen = dict(vhr.gains)
    assert set(chosen) == set(default_layers(3)) == {1, 2}
    gains = reference_gains(model, inputs, sorted(chosen))
    assert _heads({k: v.float() for k, v in chosen.items()}) == _heads(gains)
    full = ls.adapter_for(model).extend_inputs(inputs, sequences)
    again, _ = _run(model, full, gains)
    prompt = inputs["input_ids"].shape[1]
    torch.testing.assert_close(steps, again[:, prompt - 1 : prompt - 1 + STEPS], atol=ATOL, rtol=RTOL)
    assert torch.equal(steps[:, 1:].argmax(-1), sequences[:, prompt + 1 :])
    with torch.no_grad():
        _, base_steps = greedy_with_logits(model, inputs, steps=STEPS)
    assert (steps - base_steps).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_matches_reference(arch):
    """Heads and prefill logits equal the reference; cached generation equals the uncached re-forward."""
    model, processor = _model(arch)
    inputs = batch(processor)
    vhr = ls.VHR()
    with ls.steer(model, vhr) as steered:
        fast = logits(model, inputs)
        heads = vhr.heads()
        sequences, steps = _generate(steered, inputs, model)
        assert vhr.heads() == heads
    gains = reference_gains(model, inputs, default_layers(3))
    assert heads == _heads(gains)
    ref, _ = _run(model, inputs, gains)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(fast[valid], ref[valid], atol=ATOL, rtol=RTOL)
    again, _ = _run(model, ls.adapter_for(model).extend_inputs(inputs, sequences), gains)
    prompt = inputs["input_ids"].shape[1]
    torch.testing.assert_close(steps, again[:, prompt - 1 : prompt - 1 + STEPS], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_rows_equal_single_rows(arch):
    """A left-padded batch of two different images: each row gets the heads and tokens it gets alone."""
    model, processor = _model(arch)
    inputs = batch(processor)
    vhr = ls.VHR()
    with ls.steer(model, vhr) as steered:
        sequences, steps = _generate(steered, inputs, model)
        heads = vhr.heads()
        for row in (0, 1):
            single = batch(processor, rows=(row,))
            seq_row, steps_row = _generate(steered, single, model)
            assert vhr.heads() == [heads[row]]
            width = single["input_ids"].shape[1]
            assert torch.equal(seq_row[0, width:], sequences[row, inputs["input_ids"].shape[1] :])
            torch.testing.assert_close(steps_row[0], steps[row], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_one_is_identical(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    base = logits(model, inputs)
    with torch.no_grad():
        base_seq, base_steps = greedy_with_logits(model, inputs, steps=STEPS)
    vhr = ls.VHR(alpha=1.0)
    with ls.steer(model, vhr) as steered:
        assert torch.equal(logits(model, inputs), base)
        seq, steps = _generate(steered, inputs, model)
    assert torch.equal(seq, base_seq)
    assert torch.equal(steps, base_steps)


def test_plain_generate_and_eval_style_calls():
    """No special entry point: model.generate, steered.generate (the eval runner's call) and a plain forward agree."""
    model, processor = _model("llava")
    inputs = batch(processor)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with ls.steer(model, ls.VHR()) as steered, torch.inference_mode():
        direct = model.generate(**inputs, **kwargs)
        heads = steered.methods[0].heads()
        via_handle = steered.generate(**inputs, **kwargs)
        assert steered.methods[0].heads() == heads
        first = model(**inputs).logits[:, -1].argmax(-1)
    assert isinstance(via_handle, torch.Tensor) and torch.equal(direct, via_handle)
    assert torch.equal(first, direct[:, inputs["input_ids"].shape[1]])


def test_text_stream_costs_little():
    """The text-only rows run on their own (recorded once, replayed once), never padded to the image prompt."""
    model, processor = _model("llava")
    inputs = batch(processor)
    seen = []

    def spy(module, args, kwargs):
        seen.append((args or (kwargs["hidden_states"],))[0].shape[:2])

    handle = ls.adapter_for(model).layers()[0].register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with ls.steer(model, ls.VHR()):
            logits(model, inputs)
    finally:
        handle.remove()
    text_len = ls.adapter_for(model).text_only(inputs)["input_ids"].shape[1]
    assert sorted(seen) == [(2, text_len), (2, text_len), (2, inputs["input_ids"].shape[1])]


def test_outputs_beams_and_composition():
    """Recorded hidden states belong to the image forward only; beam search and other methods still work."""
    model, processor = _model("llava")
    inputs = batch(processor)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True).hidden_states
        with ls.steer(model, ls.VHR()):
            steered = model(**inputs, output_hidden_states=True).hidden_states
            beams = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
        with ls.steer(model, ls.VHR(layers=(2,)), ls.PAI(alpha=0.5, start_layer=1)) as both:
            mixed = both.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert [h.shape for h in steered] == [h.shape for h in plain]
    torch.testing.assert_close(steered[1], plain[1])  # layer 0 is before the first target layer (1)
    assert not torch.allclose(steered[-1], plain[-1])
    assert beams.shape == mixed.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_removal_leaves_no_trace():
    model, processor = _model("qwen2_vl")
    inputs = batch(processor)
    before, base = our_hooks(model), logits(model, inputs)
    with ls.steer(model, ls.VHR()) as steered:
        assert our_hooks(model) != before
        _generate(steered, inputs, model)
    assert our_hooks(model) == before and model not in _ACTIVE
    assert torch.equal(logits(model, inputs), base)


# -- the selection rule ---------------------------------------------------------------------------------------------
def test_outliers_are_zeroed_before_the_median_choice():
    """Head 0 diverges most but only because its text-only output surges: it is zeroed and not chosen."""
    text = torch.zeros(1, 6, 4)
    text[0, 0] = 10.0  # huge text-only energy
    image = text.clone()
    image[0, 0] += torch.tensor([9.0, 0, 0, 0])  # VHD 9
    for h, v in zip(range(1, 6), (1.0, 2.0, 3.0, 4.0, 5.0), strict=True):
        image[0, h, 0] = v  # VHD 1..5, tiny TA
    gains, vhd = select_heads(image, text, alpha=2.0)
    assert vhd[0, 0] == 0
    assert gains[0].tolist() == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # above the (lower) median 2: heads 3, 4, 5
    text[0, 0] = 0.0  # without the surge head 0 is an ordinary top head
    gains, _ = select_heads(image, text, alpha=2.0)
    assert gains[0, 0] == 2.0


def test_layers_spec_and_defaults():
    assert default_layers(32) == (1, *range(18, 32))
    assert default_layers(30) == (1, *range(17, 30))
    assert parse_layers("1,18-31") == (1, *range(18, 32))
    vhr = ls.parse_spec("vhr:alpha=2,layers=1,18-31")
    assert vhr.layers == (1, *range(18, 32)) and vhr.alpha == 2.0
    assert vhr.spec() == "vhr:layers=1,18-31"  # never '+', which joins methods in eval
    with pytest.raises(ls.MethodSpecError, match="commas, not '\\+'.*'1,18-31'"):
        ls.parse_spec("vhr:layers=1+18-31")
    with pytest.raises(MethodConfigError, match="commas"):
        ls.VHR(layers="1+18-31")
    assert ls.parse_spec(vhr.spec()) == vhr
    assert ls.VHR.from_dict(vhr.to_dict()).layers == vhr.layers


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": -1.0}, {"alpha": float("nan")}, {"layers": ()}])
def test_bad_settings_name_the_fix(kwargs):
    with pytest.raises(MethodConfigError, match="vhr: (alpha must be|the target-layer set is empty)"):
        ls.VHR(**kwargs)


@pytest.mark.parametrize("spec", ["vhr:layers=", "vhr:layers=a", "vhr:layers=5-2", "vhr:alpha=0"])
def test_bad_specs(spec):
    with pytest.raises((MethodSpecError, MethodConfigError)):
        ls.parse_spec(spec)


def test_layers_beyond_depth_leave_the_model_unwrapped():
    model, _ = _model("llava")
    before = our_hooks(model)
    with pytest.raises(MethodConfigError, match=r"layers \[3, 7\] are out of range.*0\.\.2"):
        ls.steer(model, ls.VHR(layers=(1, 3, 7)))
    assert our_hooks(model) == before and model not in _ACTIVE


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_without_images_is_refused(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    text = ls.adapter_for(model).text_only(inputs)
    before = our_hooks(model)
    steered = ls.steer(model, ls.VHR())
    with pytest.raises(MissingImagesError, match=r"rows \[0, 1\] contain no image tokens; give every row an image"):
        steered.generate(**text, max_new_tokens=2)
    assert not steered.active and our_hooks(model) == before and model not in _ACTIVE


def test_conflicts_with_head_edits_on_its_layers():
    model, _ = _model("llava")
    with pytest.raises(ls.ConflictError):
        ls.steer(model, ls.VHR(layers=(1,)), ls.ScaleHeads({1: [0]}))
    with ls.steer(model, ls.VHR(layers=(1,)), ls.ScaleHeads({0: [0]})):
        pass
