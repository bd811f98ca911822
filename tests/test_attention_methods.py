"""Attention-editing methods (PAI, VAR, ACT) against slow references on materialised eager attention:
prefill and cached decode, left-padded batches of two, on Llava, Qwen2-VL and Idefics3; neutral settings are
identical to the unwrapped model."""

from __future__ import annotations

import pytest
import torch
from conftest import _model, batch, greedy_with_logits, logits

import lvlm_steer as ls
from lvlm_steer.testing.references import ACTReference, PAIReference, VARReference

ARCHS = ["llava", "qwen2_vl", "idefics3"]
TOL = 1e-4


def _compare_with_reference(arch, fast, reference):
    model, processor = _model(arch)
    inputs = batch(processor)
    base = logits(model, inputs)
    with torch.no_grad():
        _, base_steps = greedy_with_logits(model, inputs)
    with ls.steer(model, fast):
        fast_logits = logits(model, inputs)
        with torch.no_grad():
            fast_seq, fast_steps = greedy_with_logits(model, inputs)
    with ls.steer(model, reference):
        ref_logits = logits(model, inputs)
        with torch.no_grad():
            ref_seq, ref_steps = greedy_with_logits(model, inputs)
    valid = inputs["attention_mask"].bool()
    assert (fast_logits - base)[valid].abs().max() > 1e-3, "the setting must change the prefill"
    assert (fast_steps[:, 1:] - base_steps[:, 1:]).abs().max() > 1e-3, "the setting must change decode steps"
    torch.testing.assert_close(fast_logits[valid], ref_logits[valid], atol=TOL, rtol=0)
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_steps, ref_steps, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_pai_matches_reference(arch):
    _compare_with_reference(arch, ls.PAI(alpha=0.8, start_layer=1), PAIReference(alpha=0.8, start_layer=1))


@pytest.mark.parametrize("arch", ARCHS)
def test_pai_neutral_is_identical(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    ref = logits(model, inputs)
    with ls.steer(model, ls.PAI(alpha=0.0)):
        assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_pai_cfg_runs_text_stream_beside_generation(arch):
    """gamma = 1 with no plausibility cut is the image stream alone; gamma > 1 changes the scores, and the
    image stream's state (Qwen2-VL rope_deltas) survives the interleaved text-only stream."""
    model, processor = _model(arch)
    inputs = batch(processor)
    kwargs = dict(
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=False,
        suppress_tokens=[model.config.image_token_id],
        output_scores=True,
        return_dict_in_generate=True,
    )
    with ls.steer(model, ls.PAI(alpha=0.5, start_layer=1)) as s:
        plain = s.generate(**inputs, **kwargs)
    with ls.steer(model, ls.PAI(alpha=0.5, start_layer=1, cfg=True, gamma=1.0, plausibility=0.0)) as s:
        same = s.generate(**inputs, **kwargs)
    assert torch.equal(plain.sequences, same.sequences)
    plain_logp = torch.log_softmax(torch.stack(plain.scores, 1), -1)
    torch.testing.assert_close(torch.stack(same.scores, 1), plain_logp, atol=1e-4, rtol=0)
    with ls.steer(model, ls.PAI(alpha=0.5, start_layer=1, cfg=True, gamma=2.0)) as s:
        mixed = s.generate(**inputs, **kwargs)
    assert not torch.allclose(torch.stack(mixed.scores, 1), plain_logp)


def test_pai_bad_settings():
    with pytest.raises(ls.MethodConfigError, match="alpha must be >= 0"):
        ls.PAI(alpha=-1)
    model, _ = _model("llava")
    with pytest.raises(ls.MethodConfigError, match=r"layers \[2, 9\) do not fit"):
        ls.steer(model, ls.PAI(end_layer=9))


VAR_SETTINGS = dict(p=0.6, rho=0.3, tau=1.5, image_mass=0.05, sink_dims=(0, 1, 2, 3), start_layer=1, skip_last=False)
ACT_SETTINGS = dict(heads={1: [0, 2], 2: [1, 3]}, beta=0.3, threshold=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_var_matches_reference(arch):
    _compare_with_reference(arch, ls.VAR(**VAR_SETTINGS), VARReference(**VAR_SETTINGS))


@pytest.mark.parametrize("arch", ARCHS)
def test_act_matches_reference(arch):
    _compare_with_reference(arch, ls.ACT(**ACT_SETTINGS), ACTReference(**ACT_SETTINGS))


@pytest.mark.parametrize("arch", ARCHS)
def test_var_and_act_neutral_are_identical(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    ref = logits(model, inputs)
    for method in (ls.VAR(**{**VAR_SETTINGS, "p": 0.0}), ls.ACT(**{**ACT_SETTINGS, "beta": 1.0})):
        with ls.steer(model, method):
            assert torch.equal(logits(model, inputs), ref), method


def test_var_sinks_follow_the_hidden_states():
    """The sinks VAR records at prefill are exactly the keys with max_d |x[d]/RMS(x)| > tau on the layer input."""
    from lvlm_steer.sinks import sink_mask

    model, processor = _model("llava")
    inputs = batch(processor)
    method = ls.VAR(**VAR_SETTINGS)
    with torch.no_grad(), ls.steer(model, method) as steered:
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        recorded = steered.state_of(method).sinks
    for layer in (1, 2):
        expected = sink_mask(hidden[layer], VAR_SETTINGS["sink_dims"], VAR_SETTINGS["tau"])
        assert torch.equal(recorded[layer], expected)
        assert expected.any() and not expected.all()


def test_attention_methods_bad_settings():
    for bad in (dict(p=1.5), dict(rho=-0.1), dict(tau=0)):
        with pytest.raises(ls.MethodConfigError, match="var: .*must be"):
            ls.VAR(**bad)
    with pytest.raises(ls.MethodConfigError, match=r"beta must be in \[0, 1\]"):
        ls.ACT(beta=2)
    model, _ = _model("llava")
    with pytest.raises(ls.MethodConfigError, match="sink dims"):
        ls.steer(model, ls.VAR(sink_dims=(999,), start_layer=1))
    with pytest.raises(ls.ConflictError, match="attention of layer 1"):
        ls.steer(model, ls.PAI(start_layer=1), ls.VAR(sink_dims=(1,), start_layer=1))


def test_var_without_known_dims_discovers_them_or_says_what_to_run(caplog):
    from lvlm_steer.sinks import clear_sink_cache

    model, processor = _model("llava")
    inputs = batch(processor)
    clear_sink_cache(model)
    # a random model has no massive activations: discovery finds none, the error names the command to run
    with pytest.raises(ls.SteeringError, match="lvlm-steer sinks"):
        with ls.steer(model, ls.VAR(start_layer=1, skip_last=False)):
            logits(model, inputs)
    assert model.config.text_config._attn_implementation == "sdpa"
    # plant a massive activation in hidden dim 13 of every row's first valid token (as real LLMs have on BOS)
    clear_sink_cache(model)
    first = inputs["attention_mask"].argmax(dim=1)

    def plant(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] == inputs["input_ids"].shape[1]:
            hidden[torch.arange(hidden.shape[0]), first, 13] += 500.0
        return output

    handle = ls.adapter_for(model).layers()[0].register_forward_hook(plant)
    try:
        # |x[d]| / RMS(x) can never exceed sqrt(hidden) = 8 here, so the paper's tau = 20 cannot fire on this model
        method = ls.VAR(start_layer=1, skip_last=False, tau=5.0)
        with caplog.at_level("WARNING", logger="lvlm_steer"), ls.steer(model, method) as steered:
            logits(model, inputs)
            state = steered.state_of(method)
        assert 13 in state.dims
        assert "discovered sink dimensions" in caplog.text
        assert state.sinks[1][torch.arange(2), first].all()
        # the same discovery from inside generate (v5 passes precomputed image features to the prefill forward)
        clear_sink_cache(model)
        in_generate = ls.VAR(start_layer=1, skip_last=False, tau=5.0)
        with torch.no_grad(), ls.steer(model, in_generate) as steered:
            model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=[model.config.image_token_id])
            assert 13 in steered.state_of(in_generate).dims
    finally:
        handle.remove()
        clear_sink_cache(model)


def test_act_default_heads_are_announced_once(caplog):
    model, processor = _model("llava")
    method = ls.ACT()
    with pytest.raises(ls.MethodConfigError, match="default layers 2..L-2 are empty"):
        ls.steer(model, method)  # the tiny model has 3 layers: the default would select nothing
    from transformers import LlamaConfig

    info = ls.ModelInfo.from_text_config(
        "llava", LlamaConfig(num_hidden_layers=8, num_attention_heads=4, hidden_size=64)
    )
    with caplog.at_level("WARNING", logger="lvlm_steer"):
        first = method.selected(info)
        method.selected(info)
    assert set(first) == set(range(2, 7)) and all(len(h) == 4 for h in first.values())
    assert caplog.text.count("no heads given") == 1
