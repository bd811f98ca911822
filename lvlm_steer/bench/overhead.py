"""`lvlm-steer bench overhead`: what wrapping costs, on the benchmark model.

Conditions: the unwrapped model, ``steer()`` with no method, and ``AblateHeads`` on 10 heads. Each run is one
greedy ``generate`` of exactly ``new_tokens`` tokens; a forward timer splits it into prefill (the first
forward) and decode. Conditions are interleaved in rotating rounds after one untimed warm-up each
(`lvlm_steer.bench.timing`): min/median/max per condition, ratios as medians of per-round ratios with their
range, and the ratios whose range is wider than their effect listed under ``unreliable``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import lvlm_steer as ls
from lvlm_steer.bench.model import benchmark_inputs, benchmark_model
from lvlm_steer.bench.timing import ForwardTimer, compare, environment, interleaved, peak_rss_mib, unreliable_ratios

METRICS = ("prefill_s", "decode_tokens_per_s", "generate_tokens_per_s", "generate_s")
# ratios to the unwrapped model: medians of per-round ratios (see lvlm_steer.bench.timing)
RATIO_LABELS = {
    "generate_tokens_per_s": "generate_throughput_vs_unwrapped",
    "decode_tokens_per_s": "decode_throughput_vs_unwrapped",
    "prefill_s": "prefill_vs_unwrapped",
}


def spread_heads(num_layers: int, num_heads: int, count: int = 10) -> dict[int, list[int]]:
    """``count`` distinct heads on up to 5 layers spread evenly over the depth (round-robin over the layers)."""
    n_layers = min(5, num_layers)
    layers = [round(i * (num_layers - 1) / max(1, n_layers - 1)) for i in range(n_layers)]
    count = min(count, num_layers * num_heads)
    heads: dict[int, list[int]] = {layer: [] for layer in layers}
    k = 0
    while sum(map(len, heads.values())) < count:
        layer = layers[k % n_layers]
        head = (3 * (k // n_layers) + layer) % num_heads
        while head in heads[layer]:
            head = (head + 1) % num_heads
        heads[layer].append(head)
        k += 1
    return {layer: sorted(hs) for layer, hs in heads.items()}


def _one_run(model, inputs: dict[str, Any], new_tokens: int) -> dict[str, float]:
    with ForwardTimer(model) as timer, torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - start
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    decode = timer.durations[1:]
    return {
        "prefill_s": timer.durations[0],
        "decode_tokens_per_s": len(decode) / sum(decode) if decode else float("nan"),
        "generate_tokens_per_s": generated * out.shape[0] / total,
        "generate_s": total,
    }


def run_overhead(variant: str = "full", runs: int = 3, new_tokens: int = 32, progress=print) -> dict[str, Any]:
    model, processor, description = benchmark_model(variant)
    inputs = benchmark_inputs(processor)
    info = ls.adapter_for(model).info
    heads = spread_heads(info.num_layers, info.num_heads)
    conditions: dict[str, list[ls.Method] | None] = {
        "unwrapped": None,
        "steer_no_method": [],
        "ablate_10_heads": [ls.AblateHeads(heads)],
    }

    def run(name: str) -> dict[str, float]:
        methods = conditions[name]
        if methods is None:
            return _one_run(model, inputs, new_tokens)
        with ls.steer(model, *methods, processor=processor):
            return _one_run(model, inputs, new_tokens)

    def report(name: str, round_index: int, r: dict[str, float]) -> None:
        progress(
            f"round {round_index}/{runs} {name}: prefill {r['prefill_s']:.2f} s, "
            f"decode {r['decode_tokens_per_s']:.2f} tok/s, generate {r['generate_tokens_per_s']:.2f} tok/s"
        )

    progress(f"warm-up: {', '.join(conditions)}")
    results = interleaved(list(conditions), runs, run, progress=report)
    comparison = compare(results, "unwrapped", METRICS)
    summary = {}
    for name, entry in comparison.items():
        summary[name] = {metric: entry[metric]["median"] for metric in METRICS}
        if name != "unwrapped":
            for metric, label in RATIO_LABELS.items():
                summary[name][label] = entry[metric]["vs_unwrapped"]["ratio"]
    return {
        "benchmark": "overhead",
        "model": description,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "new_tokens": new_tokens,
        "runs": runs,
        "ablated_heads": ls.AblateHeads(heads).spec(),
        "targets": {"steer_no_method": ">= 0.97x unwrapped throughput", "ablate_10_heads": ">= 0.95x"},
        "summary": summary,
        "spread": comparison,
        "unreliable": unreliable_ratios(comparison),
        "raw": results,
        "peak_rss_mib": peak_rss_mib(),
        "environment": environment(),
    }
