"""``lvlm-steer calibrate act``: choose ACT's heads on a labelled yes/no question set.

ACT's paper calibrates one head at a time on held-out data and keeps the heads whose calibration helps. Here:
baseline accuracy without ACT, then for each candidate (layer, head) the accuracy with ACT on that head alone;
heads with a gain above ``min_gain`` are written as the head list (JSON), with every head's score for inspection.
Pass the result to the method as ``act:heads=@heads.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvlm_steer.evals.io import write_json_atomic
from lvlm_steer.evals.pope import parse_answer
from lvlm_steer.evals.pope_eval import pope_items
from lvlm_steer.evals.runner import Runner, Shard, answer_items


def _accuracy(items, answers: list[str], parser: str) -> float:
    labels = [i.fields["label"] for i in items]
    return sum(parse_answer(a, parser, y) == y for y, a in zip(labels, answers, strict=True)) / len(items)


def calibrate_act(
    model: Any,
    processor: Any,
    question_files: Sequence[str | Path],
    images_dir: str | Path,
    out: str | Path,
    layers: Sequence[int] | None = None,
    beta: float = 0.4,
    threshold: float = 0.1,
    limit: int | None = None,
    batch_size: int = 8,
    parser: str = "pope",
    min_gain: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every head of ``layers`` (default 2..L-2) and write ``{"heads": {layer: [head, ...]}, ...}`` to ``out``."""
    from tqdm.auto import tqdm

    import lvlm_steer as ls

    items, data, *_ = pope_items(question_files, images_dir, limit=limit)
    info = ls.adapter_for(model).info
    layers = list(layers) if layers is not None else list(range(2, info.num_layers - 1))
    bad = [layer for layer in layers if not 0 <= layer < info.num_layers]
    if bad or not layers:
        raise ValueError(f"calibration layers {bad or layers} are not in this model's 0..{info.num_layers - 1}")
    runner = Runner(model, processor, Path(out).parent, batch_size, max_new_tokens=3, progress=False, shard=Shard())
    baseline = _accuracy(items, answer_items(runner, items), parser)
    candidates = [(layer, head) for layer in layers for head in range(info.num_heads)]
    scores = []
    for layer, head in tqdm(candidates, desc="calibrate act", unit="head", disable=not progress):
        method = ls.ACT(heads={layer: [head]}, beta=beta, threshold=threshold)
        accuracy = _accuracy(items, answer_items(runner, items, [method]), parser)
        scores.append({"layer": layer, "head": head, "accuracy": accuracy, "gain": accuracy - baseline})
    chosen: dict[str, list[int]] = {}
    for s in scores:
        if s["gain"] > min_gain:
            chosen.setdefault(str(s["layer"]), []).append(s["head"])
    result = {
        "method": "act",
        "heads": chosen,
        "baseline_accuracy": baseline,
        "scores": scores,
        "beta": beta,
        "threshold": threshold,
        "questions": len(items),
        "data": data,
        "parser": parser,
        "min_gain": min_gain,
    }
    write_json_atomic(out, result)
    return result
