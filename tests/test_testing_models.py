"""The tiny offline VLMs of ``lvlm_steer.testing`` build, run, generate and batch correctly for every architecture."""

from __future__ import annotations

import pytest
import torch

from lvlm_steer.testing import ARCHITECTURES, chat_prompt, make_image, tiny_batch, tiny_model, tiny_processor

PROMPTS = ("What is in the image?", "Is there a red car on the left of the picture, or a blue dog?")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def built(request):
    """(arch, model, processor), built once per architecture."""
    model, processor = tiny_model(request.param, seed=0)
    return request.param, model, processor


def _image_token_id(processor) -> int:
    tok = processor.tokenizer
    return tok.convert_tokens_to_ids(getattr(tok, "image_token", None) or processor.image_token)


def test_real_class_tiny_shape_and_token_ids(built):
    arch, model, processor = built
    text = model.config.get_text_config()
    assert model.config.model_type == arch
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert text.num_hidden_layers in (2, 3)
    assert text.vocab_size == len(processor.tokenizer) == model.get_input_embeddings().num_embeddings
    assert model.config.image_token_id == _image_token_id(processor)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_same_weights(arch):
    a, _ = tiny_model(arch, seed=0)
    b, _ = tiny_model(arch, seed=0)
    c, _ = tiny_model(arch, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_single_image_forward_and_generate(built):
    arch, model, processor = built
    enc = tiny_batch(processor, chat_prompt(processor, PROMPTS[0]), make_image(0))
    assert (enc["input_ids"] == model.config.image_token_id).sum() > 0
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 3)


def test_image_content_changes_logits(built):
    """The image path is live: a different image gives different next-token logits."""
    arch, model, processor = built
    prompt = chat_prompt(processor, PROMPTS[0])
    with torch.no_grad():
        a = model(**tiny_batch(processor, prompt, make_image(0))).logits[0, -1]
        b = model(**tiny_batch(processor, prompt, make_image(7))).logits[0, -1]
    assert (a - b).abs().max() > 1e-2


def test_left_padded_batch_matches_single_rows(built):
    arch, model, processor = built
    prompts = [chat_prompt(processor, p) for p in PROMPTS]
    images = [make_image(1), make_image(2, size=(24, 64))]
    enc = tiny_batch(processor, prompts, images)
    mask = enc["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding actually happened
    with torch.no_grad():
        batched = model(**enc).logits[:, -1]
        for row, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            single = model(**tiny_batch(processor, prompt, image)).logits[0, -1]
            torch.testing.assert_close(batched[row], single, atol=1e-5, rtol=0)
    out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2


def test_text_only_prompt(built):
    arch, model, processor = built
    prompt = chat_prompt(processor, PROMPTS[1], n_images=0)
    enc = tiny_batch(processor, prompt)
    assert not (enc["input_ids"] == model.config.image_token_id).any()
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()
    assert model.generate(**enc, max_new_tokens=2, do_sample=False).shape[1] == enc["input_ids"].shape[1] + 2


def test_two_images_in_one_prompt(built):
    arch, model, processor = built
    prompts = [chat_prompt(processor, "Compare the two images.", n_images=2), chat_prompt(processor, PROMPTS[0])]
    enc = tiny_batch(processor, prompts, [make_image(0), make_image(1, size=(24, 64)), make_image(2)])
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_processor_and_prompt_are_deterministic(arch):
    first, second = tiny_processor(arch), tiny_processor(arch)
    prompt = chat_prompt(first, PROMPTS[0])
    assert prompt == chat_prompt(second, PROMPTS[0]) and prompt.endswith("ASSISTANT:")
    enc_a, enc_b = tiny_batch(first, prompt, make_image(3)), tiny_batch(second, prompt, make_image(3))
    assert torch.equal(enc_a["input_ids"], enc_b["input_ids"])
    assert torch.equal(enc_a["pixel_values"], enc_b["pixel_values"])


def test_make_image_is_deterministic():
    assert make_image(0).tobytes() == make_image(0).tobytes() != make_image(1).tobytes()
    assert make_image(0).mode == "RGB" and make_image(0, size=(24, 64)).size == (24, 64)
