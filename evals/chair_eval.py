"""``lvlm-steer eval chair``: captions for a seeded sample of COCO images, scored with CHAIR per method."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvlm_steer.evals.chair import (
    CHAIR_RULES,
    DEFAULT_CHAIR_PROMPT,
    DEFAULT_CHAIR_RULES,
    chair_scores,
    image_files,
    load_ground_truth,
)
from lvlm_steer.evals.images import SKIP_HINT, image_problem
from lvlm_steer.evals.pope import file_sha256
from lvlm_steer.evals.run_state import write_summary
from lvlm_steer.evals.runner import Condition, EvalItem
from lvlm_steer.evals.session import run_eval


def find_annotations(coco_annotations: str | Path) -> tuple[Path, Path | None]:
    """(instances file, captions file or None) from a folder such as ``coco/annotations`` or an instances file."""
    path = Path(coco_annotations)
    if path.is_file():
        captions = path.with_name(path.name.replace("instances_", "captions_"))
        return path, captions if captions.is_file() and captions != path else None
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a COCO annotations folder nor an instances_*.json file")
    instances = sorted(path.glob("instances_*.json"))
    if len(instances) != 1:
        found = ", ".join(p.name for p in instances) or "none"
        raise FileNotFoundError(f"expected one instances_*.json in {path}, found {found}; pass the file itself")
    captions = instances[0].with_name(instances[0].name.replace("instances_", "captions_"))
    return instances[0], captions if captions.is_file() else None


def chair_items(
    instances: Path, images_dir: str | Path, n_images: int, seed: int, prompt: str, skip_missing: bool
) -> tuple[list[EvalItem], list[str], list[str]]:
    """(items, skipped missing images, skipped unreadable images) for a seeded sample of ``n_images``."""
    files = image_files(instances)
    ids = sorted(files)
    if n_images > len(ids):
        raise ValueError(f"--n-images {n_images} is more than the {len(ids)} images in {instances}")
    chosen = random.Random(seed).sample(ids, n_images)
    items, missing, unreadable = [], [], []
    for image_id in chosen:
        image = Path(images_dir) / files[image_id]
        problem = image_problem(image)
        if problem is not None:
            if not skip_missing:
                state = "is missing; check --images" if problem == "missing" else f"cannot be read ({problem})"
                raise FileNotFoundError(f"image {image} {state}; {SKIP_HINT}")
            (missing if problem == "missing" else unreadable).append(str(image))
            continue
        items.append(EvalItem(str(image_id), image, prompt, {"image_id": image_id, "image": files[image_id]}))
    if not items:
        raise ValueError("no images to caption")
    return items, missing, unreadable


def evaluate_chair(
    model: Any,
    processor: Any,
    model_name: str,
    coco_annotations: str | Path,
    images_dir: str | Path,
    conditions: Sequence[Condition],
    out_dir: str | Path,
    n_images: int = 500,
    seed: int = 0,
    batch_size: int = 8,
    prompt: str = DEFAULT_CHAIR_PROMPT,
    max_new_tokens: int = 512,
    skip_missing: bool = False,
    progress: bool = True,
    chair_rules: str = DEFAULT_CHAIR_RULES,
) -> dict[str, Any] | None:
    """Run (or resume) a CHAIR eval into ``out_dir``; ``chair_rules`` (official / fixed) only changes the scoring,
    so a finished run can be re-scored with the other rules without regenerating."""
    if chair_rules not in CHAIR_RULES:
        raise ValueError(f"unknown --chair-rules {chair_rules!r}; choose one of {', '.join(CHAIR_RULES)}")
    started = time.time()
    out_dir = Path(out_dir)
    instances, captions = find_annotations(coco_annotations)
    items, missing, unreadable = chair_items(instances, images_dir, n_images, seed, prompt, skip_missing)
    data = [{"path": str(p), "sha256": file_sha256(p)} for p in (instances, captions) if p is not None]
    identity = {
        "task": "chair",
        "model": model_name,
        "data": [d["sha256"] for d in data],
        "n_images": n_images,
        "seed": seed,
        "prompt": prompt,
    }

    def summarize(records: list[dict[str, Any]], unreadable_in_run: list[str]) -> dict[str, Any]:
        truth = load_ground_truth(instances, captions, chair_rules)
        metrics = {}
        for c in conditions:
            caps = {int(r["image_id"]): r["answer"] for r in records if r["method"] == c.label}
            metrics[c.label] = chair_scores(caps, truth, chair_rules)
            metrics[c.label]["empty_answers"] = sum(not caption.strip() for caption in caps.values())
        summary = {
            "task": "chair",
            "model": model_name,
            "methods": [c.label for c in conditions],
            "metrics": metrics,
            "data": data,
            "config": {
                "n_images": n_images,
                "seed": seed,
                "prompt": prompt,
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "decoding": "greedy",
                "ground_truth": "instances + reference captions" if captions else "instances only",
                "chair_rules": chair_rules,
                "chair_rules_detail": CHAIR_RULES[chair_rules],
            },
            "counts": {
                "records": len(records),
                "skipped_missing_images": len(missing),
                "skipped_unreadable_images": len(set(unreadable) | set(unreadable_in_run)),
            },
        }
        return write_summary(out_dir, summary, started)

    return run_eval(
        model,
        processor,
        out_dir,
        identity,
        items,
        conditions,
        lambda item, answer: {},
        summarize,
        batch_size,
        max_new_tokens,
        skip_unreadable=skip_missing,
        progress=progress,
    )
