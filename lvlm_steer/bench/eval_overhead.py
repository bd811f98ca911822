"""`lvlm-steer bench eval`: what the eval runner costs over a bare ``model.generate`` loop.

Both answer the same POPE-style questions about the same images in the same batches. The bare loop gets its
images preloaded in memory and does nothing but preprocess, generate and decode; the runner loads images from
disk (overlapped with generation), parses, and appends a flushed record per item. Questions/s for each, per
model and batch size, the two interleaved in rotating rounds (`lvlm_steer.bench.timing`): the runner's overhead
is the median of per-round ratios, with their range and an unreliable flag; its target is <= 10%.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lvlm_steer.bench.timing import compare, interleaved, median
from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX, parse_answer
from lvlm_steer.evals.runner import Condition, EvalItem, Runner, Shard, chat_text

OBJECTS = ("cat", "dog", "car", "person", "cup", "chair", "clock", "apple")


def make_items(folder: Path, n: int, image_size: int) -> list[EvalItem]:
    """``n`` questions over n/2 distinct images saved as JPEG files."""
    from lvlm_steer.bench.model import benchmark_image

    items = []
    for i in range(n):
        path = folder / f"img{i // 2}.jpg"
        if not path.exists():
            benchmark_image(size=image_size, seed=i // 2).save(path, quality=90)
        obj = OBJECTS[i % len(OBJECTS)]
        text = f"Is there a {obj} in the image? {DEFAULT_PROMPT_SUFFIX}"
        items.append(EvalItem(f"q{i}", path, text, {"label": "yes" if i % 2 else "no"}))
    return items


def bare_loop(model, processor, items: list[EvalItem], batch_size: int, max_new_tokens: int) -> float:
    """Seconds for preprocess + generate + decode over preloaded images, nothing else."""
    from PIL import Image

    images = {item.image: Image.open(item.image).convert("RGB") for item in items}
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    start = time.perf_counter()
    for k in range(0, len(items), batch_size):
        batch = items[k : k + batch_size]
        inputs = processor(
            images=[[images[i.image]] for i in batch],
            text=[chat_text(processor, i.prompt) for i in batch],
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return time.perf_counter() - start


def runner_loop(model, processor, items: list[EvalItem], batch_size: int, max_new_tokens: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        runner = Runner(model, processor, Path(out), batch_size, max_new_tokens, progress=False, shard=Shard())
        start = time.perf_counter()
        runner.run(items, [Condition("none", [])], lambda item, answer: {"prediction": parse_answer(answer)})
        return time.perf_counter() - start


def compare_loops(model, processor, items: list[EvalItem], batch_size: int, runs: int, max_new_tokens: int,
                  label: str, progress) -> dict[str, Any]:  # fmt: skip
    """Bare loop vs runner in interleaved rounds (bench.timing; the caller ran a warm-up): q/s and the overhead."""
    loops = {"bare": bare_loop, "runner": runner_loop}
    n = len(items)

    def run(name: str) -> dict[str, float]:
        return {"seconds": loops[name](model, processor, items, batch_size, max_new_tokens)}

    def report(name: str, round_index: int, r: dict[str, float]) -> None:
        progress(f"{label} round {round_index}/{runs}: {name} {n / r['seconds']:.2f} q/s")

    samples = interleaved(list(loops), runs, run, warmup=False, progress=report)
    comparison = compare(samples, "bare", ["seconds"])
    ratio = comparison["runner"]["seconds"]["vs_bare"]
    bare, ours = ([r["seconds"] for r in samples[name]] for name in loops)
    return {
        "bare_questions_per_s": n / median(bare),
        "runner_questions_per_s": n / median(ours),
        "runner_overhead": ratio["ratio"] - 1,
        "runner_overhead_range": [ratio["min"] - 1, ratio["max"] - 1],
        "unreliable": ratio["unreliable"],
        "spread": comparison,
        "bare_s": bare,
        "runner_s": ours,
    }


def run_eval_bench(
    models: list[str], batch_sizes: list[int], n_questions: int, runs: int, max_new_tokens: int, progress=print
) -> dict[str, Any]:
    from lvlm_steer.loading import load_model

    results: dict[str, Any] = {}
    for spec in models:
        model, processor = load_model(spec)
        image_size = 512 if spec.startswith("bench") else 64
        with tempfile.TemporaryDirectory() as folder:
            items = make_items(Path(folder), n_questions, image_size)
            bare_loop(model, processor, items[: batch_sizes[0]], batch_sizes[0], max_new_tokens)  # warm-up
            per_model = {}
            for bs in batch_sizes:
                label = f"{spec} batch {bs}"
                per_model[f"batch_{bs}"] = compare_loops(
                    model, processor, items, bs, runs, max_new_tokens, label, progress
                )
            first, last = per_model[f"batch_{batch_sizes[0]}"], per_model[f"batch_{batch_sizes[-1]}"]
            per_model["batch_scaling"] = last["runner_questions_per_s"] / first["runner_questions_per_s"]
        results[spec] = per_model
    return {
        "benchmark": "eval",
        "questions": n_questions,
        "runs": runs,
        "max_new_tokens": max_new_tokens,
        "target": "runner overhead <= 10% over the bare loop",
        "results": results,
        "threads": torch.get_num_threads(),
    }
