"""CARVE: pixel geometry on synthetic score maps, the captured attention against eager probabilities, the
end-to-end pipeline on tiny Llava / Qwen2-VL / Idefics3, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import _model, batch, logits, our_hooks
from PIL import Image

import lvlm_steer as ls
from lvlm_steer.adapters import ImageTile
from lvlm_steer.image_regions import (
    bounding_box,
    label_regions,
    refine_image,
    region_mask,
    score_map,
    top_fraction,
)
from lvlm_steer.testing import make_image

ARCHS = ["llava", "qwen2_vl", "idefics3"]
CAPTURE_ARCHS = [*ARCHS, "gemma3", "paligemma", "internvl", "llava_next"]
QUESTION = "What is in the image?"


# -- geometry ---------------------------------------------------------------------------------------------
def _noise(h=60, w=80, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((h, w))).float() * 0.01


def test_planted_blob_is_kept_and_is_the_crop():
    score = _noise()
    score[10:20, 30:50] += 1.0 + torch.linspace(0, 1, 20)  # the blob: 10 x 20 = 200 pixels
    p = 200 / score.numel()
    mask = region_mask(score, p=p, k=1)
    expected = torch.zeros_like(mask)
    expected[10:20, 30:50] = True
    assert torch.equal(mask, expected)
    assert bounding_box(mask) == (30, 10, 50, 20)

    rgb = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    refined = refine_image(image, score, p=p, k=1)
    assert refined.image.size == image.size
    assert refined.box == (30, 10, 50, 20)
    crop = Image.fromarray(rgb).crop((30, 10, 50, 20)).resize(image.size, Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(refined.image), np.asarray(crop))


def test_masked_pixels_inside_the_box_are_black():
    score = _noise()
    score[5:15, 5:15] += 2.0  # two blobs: the box spans both, the gap between them is masked out
    score[40:50, 60:70] += 1.0
    refined = refine_image(Image.new("RGB", (80, 60), (200, 100, 50)), score, p=200 / 4800, k=2)
    assert refined.box == (5, 5, 70, 50)
    pixels = np.asarray(refined.image.resize((65, 45), Image.Resampling.NEAREST))
    assert pixels[2, 2].tolist() == [200, 100, 50]  # inside blob 1
    assert pixels[30, 20].tolist() == [0, 0, 0]  # the gap


def test_k_regions_rule_keeps_the_strongest():
    score = _noise()
    blobs = [(2, 2), (2, 40), (30, 2), (30, 40), (45, 65)]  # 5 separate 8 x 8 blobs, strength by index
    for i, (y, x) in enumerate(blobs):
        score[y : y + 8, x : x + 8] += 1.0 + i
    p = 5 * 64 / score.numel()  # exactly the 5 blobs pass the top-p cut; int(5 * p) = 0 < k
    for k, kept in ((3, blobs[2:]), (1, blobs[4:]), (9, blobs)):
        mask = region_mask(score, p=p, k=k)
        expected = torch.zeros_like(mask)
        for y, x in kept:
            expected[y : y + 8, x : x + 8] = True
        assert torch.equal(mask, expected), k


def test_at_least_p_of_the_regions_are_kept():
    score = _noise()
    for i in range(20):  # 20 separate 2 x 2 blobs
        y, x = 3 * (i // 5) * 4, 3 * (i % 5) * 5
        score[y : y + 2, x : x + 2] += 1.0 + i
    mask = region_mask(score, p=1.0, k=1)  # p = 1 keeps every pixel: one region
    assert mask.all()
    cut = top_fraction(score, 80 / score.numel())
    assert int(cut.sum()) == 80 and label_regions(cut.numpy())[1] == 20
    # int(20 * 0.5) = 10 regions, the 10 strongest, when p = 0.5 of the blob pixels are the cut
    strongest = region_mask(score, p=80 / score.numel(), k=10)
    assert label_regions(strongest.numpy())[1] == 10


def test_top_fraction_keeps_p_of_the_pixels():
    score = torch.from_numpy(np.random.default_rng(0).permutation(1000).reshape(25, 40)).float()
    for p in (0.2, 0.05, 0.5, 1.0):
        mask = top_fraction(score, p)
        assert int(mask.sum()) == round(p * 1000)
        assert score[mask].min() > score[~mask].max() if not mask.all() else True
    with pytest.raises(ValueError, match="p must be"):
        top_fraction(score, 0.0)


def _flood_labels(mask: np.ndarray) -> np.ndarray:
    labels = np.zeros(mask.shape, int)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        labels[y0, x0] = n
        while stack:
            y, x = stack.pop()
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = y + dy, x + dx
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not labels[a, b]:
                    labels[a, b] = n
                    stack.append((a, b))
    return labels


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_connected_regions_match_a_flood_fill(density):
    mask = np.random.default_rng(int(density * 100)).random((40, 50)) < density
    labels, n = label_regions(mask)
    expected = _flood_labels(mask)
    assert n == expected.max()
    # same partition: a bijection between label ids
    pairs = set(zip(labels[mask].tolist(), expected[mask].tolist(), strict=True))
    assert len(pairs) == n
    assert (labels[~mask] == 0).all()


def test_score_map_places_tiles():
    one = torch.arange(6.0).reshape(2, 3)
    full = score_map([(one, (0.0, 0.0, 1.0, 1.0))], (30, 20))
    expected = torch.nn.functional.interpolate(one[None, None], size=(20, 30), mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, expected[0, 0])
    quadrant = score_map([(torch.ones(2, 2), (0.5, 0.5, 1.0, 1.0))], (30, 20))
    torch.testing.assert_close(quadrant[10:, 15:], torch.ones(10, 15))
    assert quadrant[:10].eq(0).all() and quadrant[:, :15].eq(0).all()


def test_tile_boxes_follow_the_tags_and_refuse_unplaceable_crops():
    from lvlm_steer.hooks.carve import tile_boxes

    pos = torch.zeros(2, 2, dtype=torch.long)
    tiles = [ImageTile(0, "tile", pos, r, c) for r in range(2) for c in range(2)] + [ImageTile(0, "global", pos)]
    boxes = tile_boxes(tiles)
    assert boxes[1] == (0.0, 0.5, 0.5, 1.0) and boxes[2] == (0.5, 0.0, 1.0, 0.5) and boxes[-1] == (0, 0, 1, 1)
    unplaced = [ImageTile(0, "tile", pos), ImageTile(0, "tile", pos), ImageTile(0, "global", pos)]
    assert tile_boxes(unplaced) == [None, None, (0, 0, 1, 1)]
    with pytest.raises(ls.SteeringError, match="cannot place"):
        tile_boxes(unplaced[:2])


# -- capture against materialised attention ------------------------------------------------------------
def _eager_rows(model, prompt_ids, tokens, steps, layers, columns, extra):
    """Reference: one uncached eager forward over prompt + generated tokens; head-mean attention of each step's row."""
    seq = torch.cat([prompt_ids, torch.tensor([tokens[: steps - 1]], dtype=prompt_ids.dtype)], dim=1)
    inputs = ls.adapter_for(model).extend_inputs({"input_ids": prompt_ids, **extra}, seq)
    key = next(k for k in model.config.sub_configs if "text" in k)
    model.set_attn_implementation({key: "eager"})
    try:
        with torch.no_grad():
            att = model(**inputs, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation({key: "sdpa"})
    rows = torch.arange(steps) + prompt_ids.shape[1] - 1
    return torch.stack([att[layer][0][:, rows][:, :, columns].mean(0) for layer in layers], dim=1).float()


@pytest.mark.parametrize("paired", [True, False])  # True: the two runs decode side by side where they can
@pytest.mark.parametrize("arch", CAPTURE_ARCHS)
def test_captured_attention_equals_eager_probabilities(arch, paired):
    from lvlm_steer.hooks.carve import _chat

    model, processor = _model(arch)
    carve = ls.CARVE(layers=(0, 2), max_steps=4, capture_decode="batch")
    image = make_image(0)
    with ls.steer(model, carve, processor=processor) as steered:
        runs, tiles = carve.capture(steered, image, [QUESTION, carve.general_prompt], paired=paired)
    columns = torch.cat([t.positions.flatten() for t in tiles])
    for run, prompt in zip(runs, [QUESTION, carve.general_prompt], strict=True):
        steps = run.rows.shape[0]
        assert steps >= 1 and run.rows.shape[1:] == (3, columns.numel())
        enc = dict(processor(images=[[image]], text=[_chat(processor, prompt, 1)], return_tensors="pt"))
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "labels")}
        ref = _eager_rows(model, enc["input_ids"], run.tokens, steps, range(3), columns, extra)
        torch.testing.assert_close(run.rows, ref, atol=1e-5, rtol=1e-5)
        assert len(run.tokens) in (steps, steps - 1)  # the last step stops after the last captured layer


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_reading_attention_leaves_the_model_unchanged(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    ref = logits(model, inputs)
    hooks = our_hooks(model)  # transformers' own output-recording hooks may be there already
    carve = ls.CARVE(layers=(0, 2))
    with ls.steer(model, carve, processor=processor):
        with pytest.raises(ls.SteeringError, match=r"carve.*steered\.generate\(\*\*inputs"):
            logits(model, inputs)  # a plain forward would run on the unrefined image: refused, not warned
        with carve._own_forwards():  # CARVE's own forwards read attention through the capture subscription
            assert torch.equal(logits(model, inputs), ref)
            assert torch.equal(logits(model, inputs), ref)
    assert our_hooks(model) == hooks


# -- end to end ------------------------------------------------------------------------------------------
def _images():
    return [make_image(0, (64, 48)), make_image(1, (40, 56))]


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_refines_and_answers(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    questions = ["What is in the image?", "Describe the colours and the shapes you can see here, please."]
    kwargs = dict(
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        suppress_tokens=[model.config.image_token_id],
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        base = model.generate(**inputs, **kwargs)
    hooks = our_hooks(model)
    carve = ls.CARVE(layers=(1, 2), max_steps=4)
    with ls.steer(model, carve, processor=processor) as steered:
        out = steered.generate(**inputs, images=_images(), questions=questions, **kwargs)
        plain = steered.generate(
            **inputs, images=_images(), questions=questions, **(kwargs | {"return_dict_in_generate": False})
        )
    assert [r.image.size for r in carve.last_refined] == [im.size for im in _images()]
    assert all(r.mask.any() and r.mask.float().mean() <= 0.5 for r in carve.last_refined)
    assert plain.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(plain[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    change = (torch.stack(out.logits) - torch.stack(base.logits)).abs().max()
    assert change > 1e-3, "answering on the refined image must change the scores"
    assert our_hooks(model) == hooks


def test_final_pass_modes_and_general_attention_cache():
    model, processor = _model("qwen2_vl")
    image = make_image(0)
    forwards = []
    handle = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        carve = ls.CARVE(layers=(1, 2), max_steps=3)
        with ls.steer(model, carve, processor=processor) as steered:
            first = carve.refine(steered, image, QUESTION)
            n_first = len(forwards)
            again = carve.refine(steered, image, QUESTION)  # A_G comes from the cache: only Q is captured
            n_again = len(forwards) - n_first
        assert n_again < n_first
        assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
        assert torch.equal(first.mask, again.mask)
    finally:
        handle.remove()
    assert ls.adapter_for(model, processor).multi_image
    assert not ls.adapter_for(_model("llava")[0], processor).multi_image
    sizes = {}
    for final in ("both", "refined"):
        carve = ls.CARVE(layers=(1, 2), max_steps=2, final=final)
        with ls.steer(model, carve, processor=processor) as steered:
            seen = []
            hook = model.register_forward_pre_hook(
                lambda m, a, kw, seen=seen: seen.append(kw.get("input_ids")), with_kwargs=True
            )
            try:
                steered.generate(images=[image], questions=[QUESTION], max_new_tokens=1, do_sample=False)
            finally:
                hook.remove()
        final_prefill = seen[-1]  # max_new_tokens=1: the final pass is one forward
        sizes[final] = int((final_prefill == model.config.image_token_id).sum())
    assert sizes["both"] == 2 * sizes["refined"]


# -- specs and bad input ---------------------------------------------------------------------------------
def test_spec_round_trip_and_defaults():
    carve = ls.parse_spec("carve:layers=1-2,p=0.3,k=2,final=both")
    assert carve == ls.CARVE(layers=(1, 2), p=0.3, k=2, final="both")
    assert ls.parse_spec(carve.spec()) == carve
    assert ls.parse_spec("carve") == ls.CARVE()
    from lvlm_steer.hooks.carve import default_layers

    assert default_layers(32) == (20, 25) and default_layers(28) == (20, 25) and default_layers(30) == (20, 25)
    assert default_layers(3) == (2, 2) and default_layers(24) == (16, 20)


def test_bad_settings_and_inputs():
    model, processor = _model("llava")
    hooks = our_hooks(model)
    bad_settings = (dict(p=0.0), dict(p=1.5), dict(k=0), dict(lam=-1.0), dict(max_steps=0), dict(final="two"))
    for bad in (*bad_settings, dict(capture_decode="parallel")):
        with pytest.raises(ls.MethodConfigError):
            ls.CARVE(**bad)
    with pytest.raises(ls.MethodConfigError, match="hi <= 2"):
        ls.steer(model, ls.CARVE(layers=(2, 5)), processor=processor)
    assert our_hooks(model) == hooks
    with ls.steer(model, ls.CARVE(layers=(1, 2))) as steered:
        with pytest.raises(ls.SteeringError, match="processor=processor"):
            steered.generate(images=[make_image(0)], questions=[QUESTION], max_new_tokens=1)
    with ls.steer(model, ls.CARVE(layers=(1, 2)), processor=processor) as steered:
        with pytest.raises(ls.SteeringError, match="images=.*questions="):
            steered.generate(**batch(processor), max_new_tokens=1)
        with pytest.raises(ls.SteeringError, match="2 images for 1 questions"):
            steered.generate(images=_images(), questions=[QUESTION], max_new_tokens=1)
    text_only = dict(processor(text=["no image here"], return_tensors="pt"))
    carve = ls.CARVE(layers=(1, 2))
    steered = ls.steer(model, carve, processor=processor)
    with pytest.raises(ls.SteeringError, match=r"steered\.generate\("):
        logits(model, text_only)  # a plain forward is refused first (it would skip the refinement)
    with carve._own_forwards(), pytest.raises(ls.MissingImagesError, match="image tokens"):
        logits(model, text_only)  # CARVE's own forwards still need image tokens in every row
    assert not steered.active and our_hooks(model) == hooks


def test_eval_runner_and_cli_pass_the_raw_inputs(tmp_path, capsys):
    """POPE through the eval runner (batched rows, raw images and questions routed to CARVE) and `generate`."""
    from lvlm_steer.cli import main
    from lvlm_steer.evals.io import read_jsonl
    from lvlm_steer.evals.pope import build_pope
    from lvlm_steer.evals.pope_eval import evaluate_pope
    from lvlm_steer.evals.runner import parse_conditions
    from lvlm_steer.testing.coco import make_coco

    data = make_coco(tmp_path / "coco", n_images=2, seed=0)
    build_pope(data["instances"], n_images=2, seed=0, out_dir=tmp_path / "pope")
    model, processor = _model("llava")
    conditions = parse_conditions(["none", "carve:layers=1-2,max_steps=2"])
    evaluate_pope(
        model,
        processor,
        "tiny:llava",
        [tmp_path / "pope" / "coco_pope_random.json"],
        data["images_dir"],
        conditions,
        tmp_path / "out",
        batch_size=3,
        limit=4,
        max_new_tokens=2,
        progress=False,
    )
    records = list(read_jsonl(tmp_path / "out" / "results.jsonl"))
    assert sorted({r["method"] for r in records}) == ["carve:layers=1-2,max_steps=2", "none"]
    assert len(records) == 8
    assert main(["generate", "--model", "tiny:qwen2_vl", "--image", "random", "--prompt", "What is it?",
                 "--method", "carve:layers=1-2,max_steps=2", "--max-new-tokens", "2", "--json"]) == 0  # fmt: skip
    assert "carve" in capsys.readouterr().out


def test_general_run_stops_with_the_question_run_and_is_recaptured_when_too_short():
    model, processor = _model("llava")
    image = make_image(0)
    carve = ls.CARVE(layers=(1, 2), max_steps=4)
    config = model.generation_config
    eos = config.eos_token_id
    with ls.steer(model, carve, processor=processor) as steered:
        (q, g), _ = carve.capture(steered, image, [QUESTION, carve.general_prompt])
        assert q.steps == g.steps == 4 and q.complete and g.complete
        assert q.tokens[1] not in g.tokens[:2]  # so that the next line ends only the question run early
        config.eos_token_id = q.tokens[1]
        try:
            (q2, g2), _ = carve.capture(steered, image, [QUESTION, carve.general_prompt], paired=True)
            assert q2.steps == g2.steps == 2 and q2.complete and not g2.complete
            torch.testing.assert_close(g2.rows, g.rows[:2], atol=1e-6, rtol=0)
            short = carve.refine(steered, image, QUESTION)  # caches the 2-step general run
        finally:
            config.eos_token_id = eos
        again = carve.refine(steered, image, QUESTION)  # the question now runs 4 steps: G is captured again
        fresh = ls.CARVE(layers=(1, 2), max_steps=4, cache_general=False)
    with ls.steer(model, fresh, processor=processor) as steered:
        expected = fresh.refine(steered, image, QUESTION)
    torch.testing.assert_close(again.score, expected.score, atol=1e-4, rtol=1e-5)  # G alone: a full prefill
    assert (short.score - expected.score).abs().max() > 1e-2
    assert next(iter(carve._general.values())).steps == 4


def test_an_unknown_image_grid_is_refused_with_the_reason(monkeypatch):
    model, processor = _model("llava")

    def no_grid(inputs):
        raise ls.SteeringError("7 image tokens do not form a square grid; this layout needs its own adapter")

    with ls.steer(model, ls.CARVE(layers=(1, 2)), processor=processor) as steered:
        monkeypatch.setattr(steered.adapter, "image_grids", no_grid)
        with pytest.raises(ls.SteeringError, match="carve maps attention onto the image-token grid.*own adapter"):
            steered.generate(images=[make_image(0)], questions=[QUESTION], max_new_tokens=1)
