"""Training batches of the testbed: class-balanced first questions, multi-turn conversations, loss on answers only."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lvlm_steer.testbed.build import build_processor
from lvlm_steer.testbed.data import collate, make_samples
from lvlm_steer.testbed.world import NAMES


def _asked(prompt: str) -> str:
    return next(n for n in NAMES.values() if f" {n}" in f" {prompt}")


def test_class_balanced_first_question_is_independent_of_class_popularity():
    """With ``class_balanced``, rare and popular classes are each asked with about half "yes"."""
    samples = make_samples(
        random.Random(3), 4000, text_only=False, progress=1.0, caption_share=0.0, class_balanced=True
    )
    asked, said_yes = Counter(), Counter()
    for s in samples:
        name = _asked(s.prompt)
        asked[name] += 1
        said_yes[name] += s.answer == " Yes"
    for name in ("chair", "umbrella", "scissors"):  # most and least popular
        share = said_yes[name] / asked[name]
        assert abs(share - 0.5) < 0.15, (name, share, asked[name])
    assert min(asked.values()) > 4000 / 18 / 2  # every class is asked, about uniformly


def test_natural_questions_follow_popularity():
    """By default a turn asks about a present object or a uniformly drawn absent class: popular classes are
    answered "yes" more often than rare ones (the prior real instruction data teaches)."""
    samples = make_samples(random.Random(3), 3000, text_only=False, progress=1.0, caption_share=0.0, follow_ups=0)
    asked, said_yes = Counter(), Counter()
    for s in samples:
        asked[_asked(s.prompt)] += 1
        said_yes[_asked(s.prompt)] += s.answer == " Yes"
    assert said_yes["chair"] / asked["chair"] > 0.6 > 0.3 > said_yes["scissors"] / asked["scissors"]


@pytest.mark.parametrize("balanced", [False, True])
def test_follow_ups_ask_distinct_classes_with_true_answers(balanced):
    samples = make_samples(
        random.Random(5), 200, text_only=False, progress=1.0, caption_share=0.0, follow_ups=3, class_balanced=balanced
    )
    for s in samples:
        turns = [(s.prompt, s.answer), *s.follow_ups]
        names = [_asked(p) for p, _ in turns]
        assert len(set(names)) == len(names)
        assert [a == " Yes" for _, a in turns] == [n in s.scene.objects for n in names]
    answers = Counter(a for s in samples for _, a in s.follow_ups)
    assert 0.35 < answers[" Yes"] / sum(answers.values()) < 0.65


def test_collate_puts_labels_on_answer_tokens_of_every_turn():
    processor = build_processor()
    tok = processor.tokenizer
    samples = make_samples(random.Random(7), 8, text_only=False, progress=1.0, caption_share=0.0, follow_ups=2)
    batch = collate(processor, samples)
    yes, no = tok.convert_tokens_to_ids("ĠYes"), tok.convert_tokens_to_ids("ĠNo")
    for i, s in enumerate(samples):
        labels = batch["labels"][i]
        labelled = labels[labels != -100].tolist()
        expected = [yes if a == " Yes" else no for a in [s.answer, *(a for _, a in s.follow_ups)]]
        assert labelled[0::2] == expected and set(labelled[1::2]) == {tok.eos_token_id}
        text = tok.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])
        assert text.count("USER:") == 1 + len(s.follow_ups) and text.count("ASSISTANT:") == 1 + len(s.follow_ups)


def test_vision_pretraining_trains_the_tower_only_and_freezing_keeps_it(tmp_path):
    """Stage 0 changes the vision tower (the head is thrown away); with ``freeze_vision`` the later stages leave
    the pretrained tower as it was, as LLaVA keeps its CLIP encoder."""
    import torch
    from safetensors.torch import load_file

    from lvlm_steer.testbed.train import train

    kwargs = dict(steps=2, text_steps=1, batch=4, warmup=1, log_every=100, threads=1, vision_steps=0)
    init = load_file(train(tmp_path / "init", **{**kwargs, "steps": 0, "text_steps": 0}) / "model.safetensors")
    vision_only = load_file(
        train(tmp_path / "v", **{**kwargs, "steps": 0, "text_steps": 0, "vision_steps": 3}) / "model.safetensors"
    )
    frozen = load_file(train(tmp_path / "f", **{**kwargs, "vision_steps": 3}) / "model.safetensors")  # frozen: default
    tower = [k for k in init if "vision_tower" in k]
    assert tower and len(tower) < len(init)
    assert any(not torch.equal(init[k], vision_only[k]) for k in tower)
    assert all(torch.equal(init[k], vision_only[k]) for k in init if k not in tower)
    assert all(torch.equal(vision_only[k], frozen[k]) for k in tower)
    assert any(not torch.equal(vision_only[k], frozen[k]) for k in init if k not in tower)


def test_noisy_answers_say_yes_to_absent_partners_at_the_caption_noise_rate():
    from lvlm_steer.testbed.world import DEFAULT_WORLD, PARTNER

    def ghost_yes(noisy: bool) -> tuple[int, int]:
        samples = make_samples(
            random.Random(11), 3000, text_only=False, progress=1.0, caption_share=0.0, noisy_answers=noisy
        )
        wrong, conversations = 0, 0
        for s in samples:
            conversations += bool(s.scene.noisy)
            for prompt, answer in [(s.prompt, s.answer), *s.follow_ups]:
                name = _asked(prompt)
                if answer == " Yes" and name not in s.scene.objects:
                    assert PARTNER[name] in s.scene.objects  # only an absent partner is ever called present
                    wrong += 1
        return wrong, conversations

    assert ghost_yes(False)[0] == 0
    wrong, conversations = ghost_yes(True)
    # a ghost is asked about in about half the conversations that have one (4 turns, yes-pool of 2-6 names)
    assert 0.2 * DEFAULT_WORLD.caption_noise < wrong / conversations < DEFAULT_WORLD.caption_noise, wrong
