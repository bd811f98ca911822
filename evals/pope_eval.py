"""``lvlm-steer eval pope``: POPE questions through the runner, parsed, scored per split and method."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvlm_steer.evals.images import SKIP_HINT, image_problem
from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX, PARSERS, PopeSet, load_questions, parse_answer, pope_report
from lvlm_steer.evals.run_state import write_summary
from lvlm_steer.evals.runner import Condition, EvalItem, dedupe
from lvlm_steer.evals.session import run_eval


def split_labels(paths: Sequence[Path], sets: Sequence[PopeSet]) -> list[str]:
    """One label per file: its split (``random``...) when no other file has it, else enough of its path to differ.

    Ids are ``label:question_id``, so two files that share a split (``coco_pope_random.json`` and
    ``aokvqa_pope_random.json``, or ``a/`` and ``b/coco_pope_random.json``) keep their own records and metrics.
    """
    labels = [s.split or p.stem for p, s in zip(paths, sets, strict=True)]
    depth, deepest = 0, max(len(p.parent.parts) for p in paths)
    while len(set(labels)) < len(labels):
        if depth > deepest:  # the same path spelled twice: number them
            return [f"{label}#{i}" for i, label in enumerate(labels, start=1)]
        taken = [label for label in labels if labels.count(label) > 1]
        for i, path in enumerate(paths):
            if labels[i] in taken:
                labels[i] = "/".join((*path.parent.parts[len(path.parent.parts) - depth :], path.stem))
        depth += 1
    return labels


def pope_items(
    question_files: Sequence[str | Path],
    images_dir: str | Path,
    prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[list[EvalItem], list[dict[str, Any]], list[str], list[str]]:
    """(items, data description with sha256 per file, skipped missing images, skipped unreadable images)."""
    if not question_files:
        raise ValueError("no question file given; pass --questions FILE (e.g. coco_pope_random.json)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit} (None runs every question)")
    paths = [Path(p) for p in question_files]
    sets = [load_questions(p) for p in paths]
    _refuse_repeats(paths, sets)
    images_dir = Path(images_dir)
    items, data, missing, unreadable = [], [], [], []
    for path, qset, split in zip(paths, sets, split_labels(paths, sets), strict=True):
        data.append({"path": str(path), "sha256": qset.sha256, "split": split, "questions": len(qset.questions)})
        for q in qset.questions[:limit] if limit else qset.questions:
            image = images_dir / q.image
            problem = image_problem(image)
            if problem is not None:
                if not skip_missing:
                    state = "is missing; check --images" if problem == "missing" else f"cannot be read ({problem})"
                    where = f"question {q.question_id} of {path}"
                    raise FileNotFoundError(f"image {image} {state} ({where}); {SKIP_HINT}")
                (missing if problem == "missing" else unreadable).append(str(image))
                continue
            text = f"{q.text} {prompt_suffix}".strip()
            fields = {"split": split, "question_id": q.question_id, "image": q.image, "label": q.label}
            items.append(EvalItem(f"{split}:{q.question_id}", image, text, fields))
    if not items:
        reason = " after skipping missing or unreadable images" if missing or unreadable else ""
        raise ValueError(f"the question set is empty{reason}")
    return items, data, missing, unreadable


def _refuse_repeats(paths: Sequence[Path], sets: Sequence[PopeSet]) -> None:
    seen: dict[str, Path] = {}
    for path, qset in zip(paths, sets, strict=True):
        if qset.sha256 in seen:
            first = seen[qset.sha256]
            same = "is given twice" if first.resolve() == path.resolve() else f"has the same content as {first}"
            raise ValueError(f"question file {path} {same}; pass each question set once")
        seen[qset.sha256] = path


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
    items, data, missing, unreadable = pope_items(question_files, images_dir, prompt_suffix, skip_missing, limit)
    identity = {
        "task": "pope",
        "model": model_name,
        "data": [d["sha256"] for d in data],
        "prompt_suffix": prompt_suffix,
        "limit": limit,
    }
    settings = {"batch_size": batch_size, "prompt_suffix": prompt_suffix, "max_new_tokens": max_new_tokens}

    def summarize(records: list[dict[str, Any]], unreadable_in_run: list[str]) -> dict[str, Any]:
        summary = pope_summary(records, parser, [c.label for c in conditions], model_name, data, missing, **settings)
        summary["counts"]["skipped_unreadable_images"] = len(set(unreadable) | set(unreadable_in_run))
        return write_summary(out_dir, summary, started)

    return run_eval(
        model,
        processor,
        out_dir,
        identity,
        items,
        conditions,
        lambda item, answer: {"prediction": parse_answer(answer, parser, item.fields["label"])},
        summarize,
        batch_size,
        max_new_tokens,
        skip_unreadable=skip_missing,
        progress=progress,
    )


def pope_summary(records, parser, labels, model_name, data, skipped, batch_size, prompt_suffix, max_new_tokens):
    """Metrics per method (re-parsed with ``parser``, so a summary can switch parsers without regenerating).

    Every split's metrics also count the empty answers, whatever the parser reads them as (the official
    parser reads an empty answer as "yes").
    """
    metrics = {}
    for label in labels:
        mine = [r for r in records if r["method"] == label]
        rows = [dict(r, prediction=parse_answer(r["answer"], parser, r["label"])) for r in mine]
        metrics[label] = pope_report(rows, parser)
        for split, values in metrics[label].items():
            values["empty_answers"] = sum(
                not r["answer"].strip() for r in rows if split == "overall" or str(r["split"]) == split
            )
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


__all__ = ["evaluate_pope", "pope_items", "pope_summary", "dedupe", "split_labels"]
