"""Build POPE question sets (random / popular / adversarial) from a COCO instances annotation file.

Follows the POPE recipe: pick images with at least ``n_per_image`` annotated categories, ask about
``n_per_image`` present objects ("yes") and ``n_per_image`` absent ones ("no"), where the absent ones are
sampled uniformly (random), taken from the most frequent categories (popular), or taken from the categories that
most often co-occur with what is in the image (adversarial). Per image the questions alternate
yes, no, yes, no, ... like the official files, and the three splits share their positive questions (same ids,
same text), so a split's difference is only in its negatives.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import numpy as np

from .data import SPLITS, PopeQuestion, write_questions

TEMPLATE = "Is there {article} {object} in the image?"


def question_text(object_name: str) -> str:
    """The POPE question for one object, with "an" before a vowel letter (a, e, i, o, u)."""
    article = "an" if object_name[:1].lower() in "aeiou" else "a"
    return TEMPLATE.format(article=article, object=object_name)


def build_pope(
    instances_json: str | Path,
    n_images: int = 500,
    seed: int = 0,
    n_per_image: int = 3,
    out_dir: str | Path | None = None,
) -> dict[str, list[PopeQuestion]]:
    """POPE questions for each split in `SPLITS`, deterministic given ``seed``.

    Objects are COCO categories. Popularity is the number of images (over the whole annotation file) that contain
    a category; the adversarial score of an absent category is the sum, over the image's present categories, of the
    number of images where both appear. Ties go to the alphabetically first category name. Question ids count from
    1 per split and ``image`` is the COCO ``file_name``. With ``out_dir``, each split is also written there as
    ``coco_pope_{split}.json`` (official JSON-lines format).
    """
    if n_images < 1 or n_per_image < 1:
        raise ValueError(f"n_images ({n_images}) and n_per_image ({n_per_image}) must both be at least 1")
    coco = _load_coco(instances_json)
    names = {cat_id: cat["name"] for cat_id, cat in coco.cats.items()}
    cat_ids = sorted(names, key=lambda c: names[c])  # column order of the incidence matrix: by name, for ties
    column = {cat_id: j for j, cat_id in enumerate(cat_ids)}
    image_ids = sorted(coco.imgs)
    present = {img: sorted({column[a["category_id"]] for a in coco.imgToAnns.get(img, [])}) for img in image_ids}

    incidence = np.zeros((len(image_ids), len(cat_ids)), dtype=np.int64)
    for row, img in enumerate(image_ids):
        incidence[row, present[img]] = 1
    frequency = incidence.sum(axis=0)  # images per category
    cooccurrence = incidence.T @ incidence  # [a, b] = images containing both a and b
    popular_order = sorted(range(len(cat_ids)), key=lambda j: (-frequency[j], j))

    eligible = [img for img in image_ids if n_per_image <= len(present[img]) <= len(cat_ids) - n_per_image]
    if len(eligible) < n_images:
        raise ValueError(
            f"{instances_json}: only {len(eligible)} images have at least {n_per_image} annotated categories "
            f"(and {n_per_image} absent ones); asked for n_images={n_images}. Lower n_images or n_per_image."
        )

    rng = random.Random(seed)  # images and positives
    negatives_rng = random.Random(f"pope-random-negatives-{seed}")  # separate stream: positives don't depend on it
    chosen = rng.sample(eligible, n_images)
    questions: dict[str, list[PopeQuestion]] = {split: [] for split in SPLITS}
    for img in chosen:
        here = present[img]
        absent = [j for j in range(len(cat_ids)) if j not in here]
        positives = rng.sample(here, n_per_image)
        scores = cooccurrence[here].sum(axis=0)
        negatives = {
            "random": negatives_rng.sample(absent, n_per_image),
            "popular": [j for j in popular_order if j not in here][:n_per_image],
            "adversarial": sorted(absent, key=lambda j: (-scores[j], j))[:n_per_image],
        }
        file_name = coco.imgs[img]["file_name"]
        for split in SPLITS:
            out = questions[split]
            for pos, neg in zip(positives, negatives[split], strict=True):
                for j, label in ((pos, "yes"), (neg, "no")):
                    text = question_text(names[cat_ids[j]])
                    out.append(PopeQuestion(question_id=str(len(out) + 1), image=file_name, text=text, label=label))

    if out_dir is not None:
        for split in SPLITS:
            write_questions(questions[split], Path(out_dir) / f"coco_pope_{split}.json")
    return questions


def _load_coco(instances_json: str | Path):
    """pycocotools' COCO, quietly (it prints progress to stdout), with a clear error for a missing file."""
    from pycocotools.coco import COCO

    path = Path(instances_json)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO instances file not found: {path} (pass e.g. annotations/instances_val2014.json from COCO 2014)"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    if not coco.cats or not coco.imgs:
        raise ValueError(f"{path}: no categories or no images; is this a COCO *instances* annotation file?")
    return coco
