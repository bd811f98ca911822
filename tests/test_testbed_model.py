"""The shipped testbed model: loads offline, answers held-out POPE questions, looks at the image; training is
deterministic given the seed."""

from __future__ import annotations

import random

import pytest
import torch

from lvlm_steer.prompts import chat_prompt
from lvlm_steer.testbed import WEIGHTS_DIR, load_testbed
from lvlm_steer.testbed.world import NAMES, render, sample_scene

pytestmark = pytest.mark.skipif(
    not (WEIGHTS_DIR / "model.safetensors").is_file(), reason="testbed weights not built (python -m ...train)"
)


@pytest.fixture(scope="module")
def testbed():
    torch.manual_seed(0)
    return load_testbed()


def test_loads_offline_through_the_cli_loader(monkeypatch):
    from lvlm_steer.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, processor = load_model("builtin:testbed")
    assert model.config.model_type == "llava" and processor.tokenizer.padding_side == "left"
    assert sum(p.numel() for p in model.parameters()) < 2.5e6


def test_answers_held_out_pope_subset(tmp_path, testbed):
    """Greedy answers through the eval runner, parsed by the official POPE rule, on fresh held-out scenes."""
    from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX, build_pope, parse_answer
    from lvlm_steer.evals.runner import EvalItem, Runner, answer_items
    from lvlm_steer.testbed.world import write_coco

    model, processor = testbed
    data = write_coco(tmp_path, 40, seed=31337)
    questions = build_pope(data["instances"], n_images=16, seed=1)["random"]  # 96 questions, half yes
    images = data["images_dir"]
    items = [EvalItem(q.question_id, images / q.image, f"{q.text} {DEFAULT_PROMPT_SUFFIX}", {}) for q in questions]
    runner = Runner(model, processor, tmp_path / "run", batch_size=16, max_new_tokens=4, progress=False)
    answers = answer_items(runner, items)
    correct = sum(parse_answer(a) == q.label for a, q in zip(answers, questions, strict=True))
    # The shipped model measures 91.4% POPE-random on 2000 held-out images (MODEL_CARD.md); the issue asks for more
    # than 85% on this subset (96 questions, sampling error about 2.5 points). Chance or always-"yes" gives 50%.
    assert correct / len(questions) > 0.85, answers


@torch.no_grad()
def test_yes_minus_no_margin_depends_on_the_asked_class(testbed):
    """Asked about every class on the same images, the margin is higher for present than for absent classes (a
    model stuck on always-"yes" gives the same margin for every class and fails)."""
    from lvlm_steer.evals.runner import chat_text

    model, processor = testbed
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")
    rng = random.Random(4242)
    names = list(NAMES.values())
    present, absent = [], []
    for _ in range(3):
        scene = sample_scene(rng)
        texts = [chat_text(processor, f"Is there {'an' if n[0] in 'aeiou' else 'a'} {n} in the image? "
                                      "Answer the question using a single word or phrase.") for n in names]  # fmt: skip
        inputs = processor(images=[[render(scene)]] * len(names), text=texts, padding=True, return_tensors="pt")
        logits = model(**inputs).logits[:, -1]
        margin = logits[:, yes] - logits[:, no]
        assert margin.std() > 0.5, margin
        for n, m in zip(names, margin.tolist(), strict=True):
            (present if n in scene.objects else absent).append(m)
    gap = sum(present) / len(present) - sum(absent) / len(absent)
    assert gap > 1.5, (present, absent)


def test_processor_layout_matches_training_batches(testbed):
    from lvlm_steer.testbed.data import collate, make_samples

    _, processor = testbed
    samples = make_samples(random.Random(0), 3, text_only=False, progress=1.0)
    batch = collate(processor, samples)
    s = samples[0]
    text = chat_prompt(processor, s.prompt)
    ref = processor(images=[[s.image]], text=[text], return_tensors="pt")
    n = ref["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :n], ref["input_ids"][0])
    assert torch.equal(batch["pixel_values"][0], ref["pixel_values"][0])


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from lvlm_steer.testbed.train import train

    kwargs = dict(steps=3, text_steps=2, batch=4, warmup=2, log_every=100, threads=1, vision_steps=2)
    a = train(tmp_path / "a", **kwargs)
    b = train(tmp_path / "b", **kwargs)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    init = load_file(train(tmp_path / "c", **{**kwargs, "steps": 0, "text_steps": 0}) / "model.safetensors")
    assert any(not torch.equal(wa[k], init[k]) for k in wa)  # it did train
