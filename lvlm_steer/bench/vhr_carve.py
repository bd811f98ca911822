"""`lvlm-steer bench vhr-carve`: seconds per sample of baseline greedy, VHR and CARVE on the benchmark model.

One sample is one image and one question, answered with `new_tokens` greedy tokens (forced, so every condition
decodes the same number of steps). Conditions are interleaved in rotating rounds after a warm-up of each
(`lvlm_steer.bench.timing`), so that load drifts on a shared host hit them alike: medians, each condition's
min/median/max and each per-round ratio's range under ``spread``, unreliable ratios listed.

Every run uses a fresh image, so ``carve`` pays for both capture passes (question and general prompt). A second
question about the same image (``carve_second_question``, as in POPE, several questions per image) reuses the
cached general-prompt attention and pays for the question's capture only.

Every condition pays for its own preprocessing: baseline and VHR one processor call, CARVE the calls it makes
itself (question and general prompt with the image, then the final pass's images); CARVE is given only the
image and the question, since it builds its own prompts.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

QUESTION = "Describe the image."
SECOND_QUESTION = "Is there a dog in the image?"
TARGETS = {"vhr": 1.3, "carve": 4.0}


def _prompt(processor: Any, image: Any, question: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=[[image]], text=[text], return_tensors="pt"))


def run_vhr_carve_bench(
    variant: str = "full", runs: int = 3, new_tokens: int = 32, capture_steps: int = 32, progress=print
) -> dict[str, Any]:
    """Time baseline / VHR / CARVE per sample; JSON-able result with medians, ratios and the targets."""
    import lvlm_steer as ls
    from lvlm_steer.bench.model import benchmark_image, benchmark_model
    from lvlm_steer.bench.timing import compare, interleaved, median, unreliable_ratios
    from lvlm_steer.errors import MethodSpecError

    model, processor, description = benchmark_model(variant)
    notes = []
    try:
        vhr = ls.parse_spec("vhr")
    except MethodSpecError:
        vhr = None
        notes.append("vhr is not registered in this checkout: skipped")
    carve = ls.CARVE(max_steps=capture_steps)  # one instance: its A_G cache serves the second question
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def baseline(image) -> None:
        model.generate(**_prompt(processor, image, QUESTION), **kwargs)

    def with_vhr(image) -> None:
        with ls.steer(model, vhr, processor=processor) as steered:
            steered.generate(**_prompt(processor, image, QUESTION), **kwargs)

    def with_carve(image, question=QUESTION) -> None:
        with ls.steer(model, carve, processor=processor) as steered:
            steered.generate(images=[image], questions=[question], **kwargs)

    conditions = {"baseline": baseline, "vhr": with_vhr, "carve": with_carve}
    if vhr is None:
        del conditions["vhr"]
    names = list(conditions)
    seeds = itertools.count()

    def run(name: str) -> dict[str, float]:
        image = benchmark_image(seed=next(seeds))  # a fresh image every time: CARVE pays both capture passes
        out = {"seconds": _timed(lambda: conditions[name](image))}
        if name == "carve":
            out |= {f"carve.{part}": v for part, v in carve.last_seconds.items()}
            out["second_question"] = _timed(lambda: with_carve(image, SECOND_QUESTION))
            out |= {f"carve_second_question.{part}": v for part, v in carve.last_seconds.items()}
        return out

    def report(name: str, round_index: int, r: dict[str, float]) -> None:
        extra = f", second question {r['second_question']:.2f} s" if "second_question" in r else ""
        progress(f"round {round_index}/{runs}: {name} {r['seconds']:.2f} s{extra}")

    progress(f"warm-up: {', '.join(names)}")
    raw = interleaved(names, runs, run, progress=report)
    samples = {name: [{"seconds": r["seconds"]} for r in rs] for name, rs in raw.items()}
    samples["carve_second_question"] = [{"seconds": r["second_question"]} for r in raw["carve"]]
    comparison = compare(samples, "baseline", ["seconds"])
    times = {name: [r["seconds"] for r in rs] for name, rs in samples.items()}
    medians = {name: median(values) for name, values in times.items()}
    ratios = {
        name: 1.0 if name == "baseline" else c["seconds"]["vs_baseline"]["ratio"] for name, c in comparison.items()
    }
    parts = {key: [r[key] for r in raw["carve"]] for key in raw["carve"][0] if key.startswith("carve")}
    return {
        "benchmark": "vhr-carve",
        "model": description,
        "variant": variant,
        "runs": runs,
        "new_tokens": new_tokens,
        "carve": carve.spec(),
        "vhr": vhr.spec() if vhr is not None else None,
        "prompt_tokens": int(_prompt(processor, benchmark_image(), QUESTION)["input_ids"].shape[1]),
        "seconds_per_sample": medians,
        "runs_s": times,
        "carve_parts_s": {name: median(values) for name, values in parts.items()},
        "vs_baseline": ratios,
        "spread": comparison,
        "unreliable": unreliable_ratios(comparison),
        "targets": {f"{name}_vs_baseline": f"<= {limit}" for name, limit in TARGETS.items()},
        "meets_targets": {name: ratios[name] <= limit for name, limit in TARGETS.items() if name in ratios},
        "notes": notes,
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start
