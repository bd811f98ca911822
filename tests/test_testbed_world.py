"""The testbed world: annotations match what is drawn; co-occurrence, popularity and caption noise match settings."""

from __future__ import annotations

import json
import math
import random

import pytest

from lvlm_steer.testbed.world import (
    CATEGORIES,
    IDS,
    NAMES,
    PARTNER,
    WorldConfig,
    caption,
    render,
    sample_scene,
    write_coco,
)

COLOUR = {name: colour for _, name, _, _, _, colour in CATEGORIES}


def _scenes(n: int, cfg: WorldConfig | None = None, seed: int = 0):
    cfg = cfg or WorldConfig()
    rng = random.Random(seed)
    return [sample_scene(rng, cfg) for _ in range(n)], rng


def test_coco_annotations_match_drawn_objects(tmp_path):
    cfg = WorldConfig()
    paths = write_coco(tmp_path, 40, seed=3)
    inst = json.loads(paths["instances"].read_text())
    caps = json.loads(paths["captions"].read_text())
    rng = random.Random("testbed-coco-3")  # write_coco's stream: the scenes it drew, in order
    scenes = [sample_scene(rng, cfg) for _ in range(40)]
    by_image: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    assert {c["id"] for c in inst["categories"]} == set(NAMES)
    visible, total = 0, 0
    for info, scene in zip(inst["images"], scenes, strict=True):
        anns = by_image[info["id"]]
        assert len(anns) == len(scene.objects)  # count
        assert sorted(a["category_id"] for a in anns) == sorted(IDS[n] for n in scene.objects)  # categories
        image = render(scene, cfg)
        assert image.tobytes() == _open(paths["images_dir"] / info["file_name"]).tobytes()
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]  # inside the image
            crop = image.crop((int(x), int(y), int(x + w), int(y + h)))
            colour = COLOUR[NAMES[a["category_id"]]]
            total += 1
            visible += any(px == colour for px in crop.getdata())  # the icon's colour is drawn inside its box
    assert visible / total > 0.95
    assert len(caps["annotations"]) == 40


def _open(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_coco_files_are_deterministic(tmp_path):
    a = write_coco(tmp_path / "a", 10, seed=1)
    b = write_coco(tmp_path / "b", 10, seed=1)
    assert a["instances"].read_bytes() == b["instances"].read_bytes()


@pytest.mark.parametrize("p", [0.0, 0.85])
def test_pair_cooccurrence_follows_setting(p):
    """P(partner | its pair-mate was drawn first) rises with pair_probability by about p (within sampling error)."""
    scenes, _ = _scenes(3000, WorldConfig(pair_probability=p), seed=1)
    with_fork = [s for s in scenes if "fork" in s.objects]
    rate = sum("knife" in s.objects for s in with_fork) / len(with_fork)
    base = sum("knife" in s.objects for s in scenes if "fork" not in s.objects) / sum(
        "fork" not in s.objects for s in scenes
    )
    if p == 0.0:
        assert rate < base + 0.1  # no pairing: knife about as common with a fork as without
    else:
        assert rate > 0.8 and rate > base + 0.5


def test_popularity_skew():
    scenes, _ = _scenes(3000)
    counts = {name: sum(name in s.objects for s in scenes) for name in NAMES.values()}
    weights = {name: w for _, name, _, w, _, _ in CATEGORIES}
    assert counts["chair"] > 3 * counts["scissors"]
    order = sorted(weights, key=weights.get)
    # the most popular third is drawn far more often than the least popular third
    assert sum(counts[n] for n in order[-6:]) > 2 * sum(counts[n] for n in order[:6])


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_caption_noise_rate(noise):
    cfg = WorldConfig(caption_noise=noise)
    scenes, rng = _scenes(4000, cfg, seed=2)
    eligible = [s for s in scenes if s.noisy]
    noisy = 0
    for s in eligible:
        _, names = caption(s, rng, cfg)
        extra = [n for n in names if n not in s.objects]
        assert len(extra) <= 1 and all(PARTNER[e] in s.objects for e in extra)  # only an absent partner
        if extra:
            assert names.index(extra[0]) == names.index(PARTNER[extra[0]]) + 1  # named right after its partner
        noisy += bool(extra)
    se = math.sqrt(noise * (1 - noise) / len(eligible))
    assert abs(noisy / len(eligible) - noise) < 4 * se
    assert all(n in s.objects for s in scenes if not s.noisy for n in caption(s, rng, cfg)[1])


def test_pope_popular_and_adversarial_differ_from_random(tmp_path):
    from lvlm_steer.evals.pope import build_pope

    paths = write_coco(tmp_path, 200, seed=4)
    qs = build_pope(paths["instances"], n_images=50, seed=0)
    negatives = {split: [q.text for q in v if q.label == "no"] for split, v in qs.items()}
    assert negatives["popular"] != negatives["random"] and negatives["adversarial"] != negatives["random"]
