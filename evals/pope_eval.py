"""``lvlm-steer eval pope``: POPE questions through the runner, parsed, scored per split and method."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX, PARSERS, load_questions, parse_answer, pope_report
from lvlm_steer.evals.run_state import claim_out_dir, write_summary
from lvlm_steer.evals.runner import Condition, EvalItem, Runner, Shard, dedupe, mark_done, merge_shards


def pope_items(
    question_files: Sequence[str | Path],
    images_dir: str | Path,
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[list[EvalItem], list[dict[str, Any]], list[str]]:
    """(items, data description with sha256 per file, skipped image paths)."""
    if not question_files:
        raise ValueError("no question file given; pass --questions FILE (e.g. coco_pope_random.json)")
    images_dir = Path(images_dir)
    items, data, skipped = [], [], []
    for path in question_files:
        qset = load_questions(path)
        split = qset.split or Path(path).stem
        data.append({"path": str(path), "sha256": qset.sha256, "split": split, "questions": len(qset.questions)})
        questions = qset.questions[:limit] if limit else qset.questions
        for q in questions:
            image = images_dir / q.image
            if not image.is_file():
                if not skip_missing:
                    raise FileNotFoundError(
                        f"image {image} (question {q.question_id} of {path}) is missing; check --images, "
                        "or pass --skip-missing to leave such questions out (they are counted in the summary)"
                    )
                skipped.append(str(image))
                continue
            text = f"{q.text} {prompt_suffix}".strip()
            fields = {"split": split, "question_id": q.question_id, "image": q.image, "label": q.label}
            items.append(EvalItem(f"{split}:{q.question_id}", image, text, fields))
    if not items:
        reason = " after skipping missing images" if skipped else ""
        raise ValueError(f"the question set is empty{reason}")
    return items, data, skipped


def evaluate_pope(
    model: Any,
    processor: Any,
    model_name: str,
    question_files: Sequence[str | Path],
    images_dir: str | Path,
    conditions: Sequence[Condition],
    out_dir: str | Path,
    batch_size: int = 8,
    parser: str = "pope",
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
    skip_missing: bool = False,
    limit: int | None = None,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run (or resume) a POPE eval into ``out_dir``; return the summary (None on ranks other than 0)."""
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; choose one of {', '.join(PARSERS)}")
    started = time.time()
    out_dir = Path(out_dir)
    items, data, skipped = pope_items(question_files, images_dir, prompt_suffix, skip_missing, limit)
    shard = Shard.from_env()
    claim_out_dir(
        out_dir,
        {
            "task": "pope",
            "model": model_name,
            "data": [d["sha256"] for d in data],
            "prompt_suffix": prompt_suffix,
            "limit": limit,
        },
    )
    runner = Runner(model, processor, out_dir, batch_size, max_new_tokens, progress, shard)
    runner.run(items, conditions, lambda it, answer: {"prediction": parse_answer(answer, parser, it.fields["label"])})
    mark_done(out_dir, shard)
    if shard.rank != 0:
        return None
    records = merge_shards(out_dir, shard.world, [i.id for i in items])
    return write_summary(
        out_dir,
        pope_summary(
            records,
            parser,
            [c.label for c in conditions],
            model_name,
            data,
            skipped,
            batch_size,
            prompt_suffix,
            max_new_tokens,
        ),
        started,
    )


def pope_summary(records, parser, labels, model_name, data, skipped, batch_size, prompt_suffix, max_new_tokens):
    """Metrics per method (re-parsed with ``parser``, so a summary can switch parsers without regenerating)."""
    metrics = {}
    for label in labels:
        mine = [r for r in records if r["method"] == label]
        rows = [dict(r, prediction=parse_answer(r["answer"], parser, r["label"])) for r in mine]
        metrics[label] = pope_report(rows, parser)
    return {
        "task": "pope",
        "model": model_name,
        "methods": labels,
        "metrics": metrics,
        "data": data,
        "config": {
            "parser": parser,
            "batch_size": batch_size,
            "prompt_suffix": prompt_suffix,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
        },
        "counts": {"records": len(records), "skipped_missing_images": len(skipped)},
    }


__all__ = ["evaluate_pope", "pope_items", "pope_summary", "dedupe"]
