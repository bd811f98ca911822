"""A tiny synthetic COCO-2014-style dataset on disk, for testing POPE / CHAIR code without downloading COCO.

Images are small JPEGs with one coloured shape per annotated box. Each image holds 3-5 of 12 real COCO categories
(real ids and names) drawn with a popularity skew, and fork and knife usually come together, so "popular" and
"adversarial" negatives differ from random ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

# (COCO id, name, supercategory, sampling weight): weights give the popularity skew
CATEGORIES = (
    (1, "person", "person", 10.0),
    (67, "dining table", "furniture", 6.0),
    (47, "cup", "kitchen", 5.0),
    (62, "chair", "furniture", 4.0),
    (3, "car", "vehicle", 3.0),
    (48, "fork", "kitchen", 2.5),
    (51, "bowl", "kitchen", 2.0),
    (49, "knife", "kitchen", 1.5),
    (52, "banana", "food", 1.2),
    (53, "apple", "food", 1.0),
    (2, "bicycle", "vehicle", 0.8),
    (28, "umbrella", "accessory", 0.6),
)
FORK, KNIFE = 48, 49
PAIR_PROBABILITY = 0.85  # chance that an image with a fork also gets a knife


def make_coco(out_dir: str | Path, n_images: int = 12, seed: int = 0, image_size: tuple[int, int] = (96, 72)) -> dict:
    """Write ``val2014/*.jpg`` and ``annotations/{instances,captions}_val2014.json`` under ``out_dir``.

    Returns ``{"root", "images_dir", "instances", "captions", "image_ids"}`` (paths as `Path`). Same seed, same
    files (annotations byte for byte).
    """
    width, height = image_size
    if width < 16 or height < 16:
        raise ValueError(f"image_size {image_size} is too small; use at least (16, 16)")
    rng = random.Random(seed)
    root = Path(out_dir)
    images_dir = root / "val2014"
    ann_dir = root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    names = {cat_id: name for cat_id, name, _, _ in CATEGORIES}

    image_ids = sorted(rng.sample(range(1, 600_000), n_images))
    images, annotations, captions = [], [], []
    for image_id in image_ids:
        file_name = f"COCO_val2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        cat_ids = _pick_categories(rng)
        picture = Image.new("RGB", image_size, _colour(rng))
        draw = ImageDraw.Draw(picture)
        for cat_id in cat_ids:
            for _ in range(rng.randint(1, 2)):
                box = _box(rng, width, height)
                _draw(draw, rng, box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat_id,
                        "bbox": [float(v) for v in box],
                        "area": float(box[2] * box[3]),
                        "iscrowd": 0,
                        "segmentation": [_polygon(box)],
                    }
                )
        picture.save(images_dir / file_name, quality=90)
        objects = [names[c] for c in cat_ids]
        for text in _captions(rng, objects):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})

    info = {"description": f"synthetic COCO-style test data (lvlm_steer.testing.coco, seed={seed})", "year": 2014}
    categories = [{"id": c, "name": n, "supercategory": s} for c, n, s, _ in sorted(CATEGORIES)]
    instances = ann_dir / "instances_val2014.json"
    captions_path = ann_dir / "captions_val2014.json"
    _dump(
        instances,
        {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories},
    )
    _dump(captions_path, {"info": info, "licenses": [], "images": images, "annotations": captions})
    return {
        "root": root,
        "images_dir": images_dir,
        "instances": instances,
        "captions": captions_path,
        "image_ids": image_ids,
    }


def _pick_categories(rng: random.Random) -> list[int]:
    """3-5 distinct category ids, drawn by weight without replacement; a fork usually brings a knife."""
    k = rng.randint(3, 5)
    pool = {cat_id: weight for cat_id, _, _, weight in CATEGORIES}
    chosen: list[int] = []
    while len(chosen) < k:
        ids = sorted(pool)
        pick = rng.choices(ids, weights=[pool[i] for i in ids])[0]
        chosen.append(pick)
        del pool[pick]
    if FORK in chosen and KNIFE not in chosen and rng.random() < PAIR_PROBABILITY:
        if len(chosen) < 5:
            chosen.append(KNIFE)
        else:
            chosen[-1 if chosen[-1] != FORK else -2] = KNIFE
    return chosen


def _box(rng: random.Random, width: int, height: int) -> list[int]:
    """[x, y, w, h] inside the image."""
    w = rng.randint(4, width // 2)
    h = rng.randint(4, height // 2)
    return [rng.randint(0, width - w), rng.randint(0, height - h), w, h]


def _polygon(box: list[int]) -> list[float]:
    x, y, w, h = box
    return [float(v) for v in (x, y, x + w, y, x + w, y + h, x, y + h)]


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))


def _draw(draw: ImageDraw.ImageDraw, rng: random.Random, box: list[int]) -> None:
    x, y, w, h = box
    corners = (x, y, x + w - 1, y + h - 1)
    if rng.random() < 0.5:
        draw.rectangle(corners, fill=_colour(rng))
    else:
        draw.ellipse(corners, fill=_colour(rng))


def _with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _captions(rng: random.Random, objects: list[str]) -> list[str]:
    """Two plain-English captions: one naming every object, one naming two of them."""
    named = [_with_article(o) for o in objects]
    first = f"A picture of {', '.join(named[:-1])} and {named[-1]}."
    a, b = rng.sample(named, 2)
    second = f"There is {a} next to {b}."
    return [first, second]


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")
