"""Bad input gives an error that names the fix, and leaves the model unwrapped."""

from __future__ import annotations

import pytest
import torch
from conftest import _model, batch, logits, our_hooks
from transformers import LlamaConfig, LlamaForCausalLM

import lvlm_steer as ls
from lvlm_steer.attention import _ROUTES
from lvlm_steer.testing import chat_prompt, tiny_batch


@pytest.fixture
def llava():
    return _model("llava")


def _assert_unwrapped(model, hooks_before):
    assert our_hooks(model) == hooks_before
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_layer_out_of_range_names_valid_range(llava):
    model, _ = llava
    hooks = our_hooks(model)
    n = model.config.text_config.num_hidden_layers
    with pytest.raises(ls.MethodConfigError, match=rf"layer {n} is out of range.*0\.\.{n - 1}"):
        ls.steer(model, ls.AblateHeads({n: [0]}))
    _assert_unwrapped(model, hooks)


def test_head_out_of_range_names_valid_range(llava):
    model, _ = llava
    hooks = our_hooks(model)
    with pytest.raises(ls.MethodConfigError, match=r"head 4 in layer 0 is out of range.*0\.\.3"):
        ls.steer(model, ls.ScaleHeads({0: {4: 2.0}}))
    with pytest.raises(ls.MethodConfigError, match="out of range"):
        ls.steer(model, "ablate:heads=0.-1")
    _assert_unwrapped(model, hooks)


def test_unsupported_model_lists_supported_ones():
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ls.UnsupportedModelError, match=r"model_type='llama'.*llava.*register_adapter"):
        ls.steer(model)
    assert not our_hooks(model)


def test_conflicting_methods_are_refused(llava):
    model, _ = llava
    hooks = our_hooks(model)
    with pytest.raises(ls.ConflictError, match=r"both edit head 1\.2"):
        ls.steer(model, ls.AblateHeads({1: [2]}), ls.ScaleHeads({1: {2: 2.0}}))
    _assert_unwrapped(model, hooks)
    # disjoint heads compose
    with ls.steer(model, ls.AblateHeads({1: [2]}), ls.ScaleHeads({1: {3: 2.0}})):
        pass
    _assert_unwrapped(model, hooks)


def test_steering_twice_is_refused(llava):
    model, _ = llava
    with ls.steer(model, ls.AblateHeads({0: [0]})):
        with pytest.raises(ls.ConflictError, match="already steered"):
            ls.steer(model, ls.ScaleHeads({1: [0]}))
    hooks = our_hooks(model)
    with ls.steer(model):  # fine again once removed
        pass
    assert our_hooks(model) == hooks


def test_batch_without_images_for_a_method_that_needs_them(llava):
    model, processor = llava
    hooks = our_hooks(model)
    text_only = dict(tiny_batch(processor, [chat_prompt(processor, "Hello there", n_images=0)]))
    ref = logits(model, text_only)
    steered = ls.steer(model, ls.AblateHeads({0: [1]}, where="image"))
    with pytest.raises(ls.MissingImagesError, match=r"rows \[0\] contain no image tokens.*steering was removed"):
        logits(model, text_only)
    assert not steered.active
    _assert_unwrapped(model, hooks)
    assert torch.equal(logits(model, text_only), ref)
    # the same method is fine on a batch with images, and edits only image-token rows
    inputs = batch(processor)
    base = logits(model, inputs)
    with ls.steer(model, ls.AblateHeads({0: [1]}, where="image")):
        out = logits(model, inputs)
    first_image = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert torch.equal(out[0, :first_image], base[0, :first_image])  # before the image: untouched
    assert (out - base).abs().max() > 1e-4


def test_bad_method_parameters():
    with pytest.raises(ls.MethodConfigError, match="mode='half' is not one of zero, mean, constant"):
        ls.AblateHeads({0: [0]}, mode="half")
    with pytest.raises(ls.MethodConfigError, match="where='everywhere'"):
        ls.ScaleHeads({0: [0]}, where="everywhere")
    with pytest.raises(ls.MethodConfigError, match="must be finite"):
        ls.ScaleHeads({0: {0: float("nan")}})


def test_unsupported_attention_implementation(llava):
    model, _ = llava
    text_cfg = model.config.text_config
    text_cfg._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(ls.UnsupportedModelError, match="attn_implementation='sdpa'"):
            ls.steer(model)
    finally:
        text_cfg._attn_implementation_internal = "sdpa"
    assert not any(m in _ROUTES for m in model.modules())
