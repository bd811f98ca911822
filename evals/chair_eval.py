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
from lvlm_steer.evals.pope import file_sha256
from lvlm_steer.evals.run_state import claim_out_dir, write_summary
from lvlm_steer.evals.runner import Condition, EvalItem, Runner, Shard, mark_done, merge_shards


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
) -> tuple[list[EvalItem], list[str]]:
    files = image_files(instances)
    ids = sorted(files)
    if n_images > len(ids):
        raise ValueError(f"--n-images {n_images} is more than the {len(ids)} images in {instances}")
    chosen = random.Random(seed).sample(ids, n_images)
    items, skipped = [], []
    for image_id in chosen:
        image = Path(images_dir) / files[image_id]
        if not image.is_file():
            if not skip_missing:
                raise FileNotFoundError(f"image {image} is missing; check --images, or pass --skip-missing")
            skipped.append(str(image))
            continue
        items.append(EvalItem(str(image_id), image, prompt, {"image_id": image_id, "image": files[image_id]}))
    if not items:
        raise ValueError("no images to caption")
    return items, skipped


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
    items, skipped = chair_items(instances, images_dir, n_images, seed, prompt, skip_missing)
    data = [{"path": str(p), "sha256": file_sha256(p)} for p in (instances, captions) if p is not None]
    shard = Shard.from_env()
    claim_out_dir(
        out_dir,
        {
            "task": "chair",
            "model": model_name,
            "data": [d["sha256"] for d in data],
            "n_images": n_images,
            "seed": seed,
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
        },
    )
    runner = Runner(model, processor, out_dir, batch_size, max_new_tokens, progress, shard)
    runner.run(items, conditions, lambda item, answer: {})
    mark_done(out_dir, shard)
    if shard.rank != 0:
        return None
    records = merge_shards(out_dir, shard.world, [i.id for i in items])
    truth = load_ground_truth(instances, captions, chair_rules)
    metrics = {}
    for c in conditions:
        caps = {int(r["image_id"]): r["answer"] for r in records if r["method"] == c.label}
        metrics[c.label] = chair_scores(caps, truth, chair_rules)
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
        "counts": {"records": len(records), "skipped_missing_images": len(skipped)},
    }
    return write_summary(out_dir, summary, started)
