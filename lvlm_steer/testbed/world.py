"""The synthetic world of the testbed: COCO categories drawn as PIL icons, with a known co-occurrence prior.

Each scene holds 1-5 distinct categories (one icon each, random position and size, icons may overlap) on a muted,
textured background. Categories are drawn with a popularity skew; every category has a partner (fork and knife,
...) that often comes with it. Training captions list the objects with partners next to each other and, at a
controlled rate, name an absent partner right after its present one: the noisy-caption route by which real LVLMs
learn to hallucinate.
"""

from __future__ import annotations

import colorsys
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 48

# (COCO id, name, supercategory, popularity weight, icon shape, icon colour)
CATEGORIES: tuple[tuple[int, str, str, float, str, tuple[int, int, int]], ...] = (
    (62, "chair", "furniture", 9.0, "plus", (150, 75, 20)),
    (47, "cup", "kitchen", 8.0, "square", (20, 60, 230)),
    (44, "bottle", "kitchen", 7.0, "vbar", (20, 170, 40)),
    (84, "book", "indoor", 6.0, "hbar", (220, 20, 20)),
    (85, "clock", "indoor", 5.0, "ring", (15, 15, 15)),
    (48, "fork", "kitchen", 4.0, "vbar", (245, 245, 245)),
    (49, "knife", "kitchen", 3.5, "hbar", (245, 245, 245)),
    (50, "spoon", "kitchen", 3.0, "circle", (245, 245, 245)),
    (51, "bowl", "kitchen", 2.6, "bowl", (20, 60, 230)),
    (53, "apple", "food", 2.2, "circle", (220, 20, 20)),
    (52, "banana", "food", 2.0, "hbar", (250, 220, 0)),
    (55, "orange", "food", 1.8, "circle", (255, 140, 0)),
    (59, "pizza", "food", 1.5, "triangle", (255, 140, 0)),
    (60, "donut", "food", 1.3, "ring", (255, 120, 200)),
    (61, "cake", "food", 1.1, "square", (255, 120, 200)),
    (86, "vase", "indoor", 1.0, "diamond", (150, 30, 200)),
    (87, "scissors", "indoor", 0.9, "x", (15, 15, 15)),
    (28, "umbrella", "accessory", 0.8, "triangle", (150, 30, 200)),
)
# Co-occurrence pairs: when one is in a scene, the other is added with probability `WorldConfig.pair_probability`.
PAIRS: tuple[tuple[str, str], ...] = (
    ("fork", "knife"), ("cup", "spoon"), ("apple", "banana"), ("book", "clock"), ("bowl", "orange"),
    ("pizza", "bottle"), ("donut", "cake"), ("vase", "scissors"), ("chair", "umbrella"),
)  # fmt: skip

NAMES = {cid: name for cid, name, *_ in CATEGORIES}
IDS = {name: cid for cid, name, *_ in CATEGORIES}
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}


@dataclass(frozen=True)
class WorldConfig:
    """The knobs of the world; defaults are the shipped testbed's."""

    min_objects: int = 1
    max_objects: int = 5
    pair_probability: float = 0.6
    caption_noise: float = 0.6  # chance a caption names an absent partner, when the scene has one to name
    min_size: int = 7
    max_size: int = 16
    image_size: int = IMAGE_SIZE
    max_overlap: float = 0.25  # largest share of either box that another icon may cover (placement retries)


DEFAULT_WORLD = WorldConfig()


@dataclass
class Scene:
    """One image's ground truth: category names (in caption order, partners adjacent) and their boxes."""

    objects: list[str]
    boxes: list[list[int]]  # [x, y, w, h] per object, inside the image
    background: tuple[int, int, int]
    texture_seed: int
    noisy: list[str] = field(default_factory=list)  # absent partners a noisy caption may name


def sample_scene(rng: random.Random, cfg: WorldConfig = WorldConfig()) -> Scene:
    """Draw categories (popularity-weighted, partners usually together), an order, boxes and a background."""
    k = rng.randint(cfg.min_objects, cfg.max_objects)
    pool = {name: weight for _, name, _, weight, *_ in CATEGORIES}
    chosen: list[str] = []
    while len(chosen) < k and pool:
        names = list(pool)
        pick = rng.choices(names, weights=[pool[n] for n in names])[0]
        chosen.append(pick)
        del pool[pick]
        partner = PARTNER.get(pick)
        if partner in pool and len(chosen) < cfg.max_objects and rng.random() < cfg.pair_probability:
            chosen.append(partner)
            del pool[partner]
    # caption order: shuffle units (an object with its present partner), keep partners adjacent
    units: list[list[str]] = []
    for name in chosen:
        if any(PARTNER.get(name) in u for u in units):
            next(u for u in units if PARTNER.get(name) in u).append(name)
        else:
            units.append([name])
    rng.shuffle(units)
    objects = [n for u in units for n in u]
    boxes: list[list[int]] = []
    for _ in objects:
        for _attempt in range(20):  # icons may overlap a little (partly hidden), rarely a lot
            w = rng.randint(cfg.min_size, cfg.max_size)
            h = max(cfg.min_size, min(cfg.max_size, int(w * rng.uniform(0.8, 1.25))))
            box = [rng.randint(0, cfg.image_size - w), rng.randint(0, cfg.image_size - h), w, h]
            if all(_overlap(box, other) <= cfg.max_overlap for other in boxes):
                break
        boxes.append(box)
    hue, sat, val = rng.random(), rng.uniform(0.1, 0.35), rng.uniform(0.35, 0.7)
    background = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val))
    noisy = [PARTNER[n] for n in objects if n in PARTNER and PARTNER[n] not in objects]
    return Scene(objects, boxes, background, rng.randrange(2**31), noisy)  # type: ignore[arg-type]


def _overlap(a: list[int], b: list[int]) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return 0.0 if w <= 0 or h <= 0 else w * h / min(a[2] * a[3], b[2] * b[3])


def render(scene: Scene, cfg: WorldConfig = WorldConfig()) -> Image.Image:
    """Draw the scene: textured background, then the icons in caption order (later ones may hide earlier ones)."""
    size = cfg.image_size
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    tex = random.Random(scene.texture_seed)
    for _ in range(6):  # faint blotches so the background is not flat
        x, y, r = tex.randrange(size), tex.randrange(size), tex.randint(3, 10)
        shade = tuple(max(0, min(255, c + tex.randint(-18, 18))) for c in scene.background)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
    style = {name: (shape, colour) for _, name, _, _, shape, colour in CATEGORIES}
    for name, box in zip(scene.objects, scene.boxes, strict=True):
        _icon(draw, *style[name], box)
    return image


def _icon(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], box: list[int]) -> None:
    x, y, w, h = box
    x1, y1 = x + w - 1, y + h - 1
    cx, cy = x + w / 2, y + h / 2
    t = max(2, min(w, h) // 3)  # stroke thickness
    if shape == "square":
        draw.rectangle((x, y, x1, y1), fill=colour)
    elif shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=colour)
    elif shape == "ring":
        draw.ellipse((x, y, x1, y1), outline=colour, width=t)
    elif shape == "vbar":
        draw.rectangle((cx - t / 2, y, cx + t / 2, y1), fill=colour)
    elif shape == "hbar":
        draw.rectangle((x, cy - t / 2, x1, cy + t / 2), fill=colour)
    elif shape == "plus":
        draw.rectangle((cx - t / 2, y, cx + t / 2, y1), fill=colour)
        draw.rectangle((x, cy - t / 2, x1, cy + t / 2), fill=colour)
    elif shape == "x":
        draw.line((x, y, x1, y1), fill=colour, width=t)
        draw.line((x, y1, x1, y), fill=colour, width=t)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=colour)
    elif shape == "bowl":
        draw.pieslice((x, y - h, x1, y1), 0, 180, fill=colour)
    else:  # pragma: no cover - guarded by the CATEGORIES table
        raise ValueError(f"unknown icon shape {shape!r}")


def article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def caption(scene: Scene, rng: random.Random, cfg: WorldConfig = WorldConfig()) -> tuple[str, list[str]]:
    """(training caption, names it mentions). With probability ``caption_noise`` (when the scene has an absent
    partner) one absent partner is named right after its present partner."""
    names = list(scene.objects)
    if scene.noisy and rng.random() < cfg.caption_noise:
        ghost = rng.choice(scene.noisy)
        names.insert(names.index(PARTNER[ghost]) + 1, ghost)
    return f"There is {list_text(names)}.", names


def write_coco(
    out_dir: str | Path, n_images: int, seed: int = 1234, cfg: WorldConfig = WorldConfig(), split: str = "val2014"
) -> dict[str, Path]:
    """Render ``n_images`` held-out scenes as PNGs with COCO ``instances``/``captions`` JSON (deterministic in seed).

    The reference captions are clean (they name what is drawn), like COCO's human captions.
    """
    rng = random.Random(f"testbed-coco-{seed}")
    root = Path(out_dir)
    images_dir, ann_dir = root / split, root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, captions = [], [], []
    for image_id in range(1, n_images + 1):
        scene = sample_scene(rng, cfg)
        file_name = f"testbed_{split}_{image_id:06d}.png"
        render(scene, cfg).save(images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
        for name, (x, y, w, h) in zip(scene.objects, scene.boxes, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": IDS[name],
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": 0,
                    "segmentation": [[float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]],
                }
            )
        text = f"There is {list_text(scene.objects)}."
        captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    info = {"description": f"lvlm-steer testbed world (seed={seed})", "year": 2014}
    cats = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup, *_ in sorted(CATEGORIES)]
    instances = ann_dir / f"instances_{split}.json"
    captions_path = ann_dir / f"captions_{split}.json"
    instances.write_text(
        json.dumps({"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": cats})
    )
    captions_path.write_text(json.dumps({"info": info, "licenses": [], "images": images, "annotations": captions}))
    return {"root": root, "images_dir": images_dir, "instances": instances, "captions": captions_path}


def list_text(names: list[str]) -> str:
    """"a fork, a knife and a cup"."""
    listed = [article(n) for n in names]
    return listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} and {listed[-1]}"
