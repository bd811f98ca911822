"""`lvlm-steer bench attention`: VAR (fast and eager reference), ACT and PAI against unwrapped sdpa.

Each condition runs in its own process (so peak memory is that condition's alone): the benchmark model, one
~1.2k-token prompt, prefill then `decode_steps` greedy steps, `runs` times after a warm-up; medians of prefill
time and decode tokens/s, and the peak resident memory over what the process held before the first forward
("extra" memory: the growth of the peak over what the process held after a warm-up run, so imports and
allocator pools do not count; the unwrapped run's extra is the baseline for attention memory).

The benchmark model has random weights, so it has no real massive activations: VAR gets explicit sink dimensions
(the work per edited row does not depend on how many keys are sinks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

CONDITIONS = ("unwrapped", "var", "var_reference", "act", "pai")


def _methods(name: str):
    import lvlm_steer as ls
    from lvlm_steer.testing.references import VARReference

    var = dict(sink_dims=(0, 1), tau=20.0)
    return {
        "unwrapped": None,
        "var": [ls.VAR(**var)],
        "var_reference": [VARReference(**var)],
        "act": [ls.ACT()],
        "pai": [ls.PAI()],
    }[name]


def run_condition(name: str, variant: str, runs: int, decode_steps: int) -> dict[str, Any]:
    """Time one condition in this process (called in a subprocess by `run_attention_bench`)."""
    import logging

    import torch

    import lvlm_steer as ls
    from lvlm_steer.bench.model import benchmark_inputs, benchmark_model
    from lvlm_steer.bench.timing import ForwardTimer, median, reset_peak_rss, rss_mib

    logging.getLogger("lvlm_steer").setLevel(logging.ERROR)
    model, processor, description = benchmark_model(variant)
    inputs = benchmark_inputs(processor)
    methods = _methods(name)
    if name == "var_reference":
        model.set_attn_implementation({"text_config": "eager"})  # the official setting: materialised attention
    prefill, decode = [], []
    before = float("nan")
    for i in range(runs + 1):
        steering = ls.steer(model, *methods, processor=processor) if methods is not None else None
        try:
            with ForwardTimer(model) as timer, torch.inference_mode():
                model.generate(
                    **inputs, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1, do_sample=False
                )
        finally:
            if steering is not None:
                steering.remove()
        if i == 0:  # the first run is a warm-up (imports, allocator pools); memory is measured from here
            reset_peak_rss()
            before = rss_mib()
        else:
            prefill.append(timer.durations[0])
            decode.append(len(timer.durations[1:]) / sum(timer.durations[1:]))
    return {
        "condition": name,
        "model": description["name"],
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "prefill_s": median(prefill),
        "decode_tokens_per_s": median(decode),
        "prefill_runs": prefill,
        "extra_peak_rss_mib": rss_mib("VmHWM") - before,
    }


def run_attention_bench(variant: str = "full", runs: int = 3, decode_steps: int = 64, progress=print) -> dict:
    results = {}
    for name in CONDITIONS:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "lvlm_steer.bench.attention", name, variant, str(runs), str(decode_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench attention: condition {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        progress(
            f"{name}: prefill {r['prefill_s']:.2f} s, decode {r['decode_tokens_per_s']:.2f} tok/s, "
            f"extra peak {r['extra_peak_rss_mib']:.0f} MiB ({time.perf_counter() - start:.0f} s)"
        )
    base = results["unwrapped"]
    for r in results.values():
        r["prefill_vs_unwrapped"] = r["prefill_s"] / base["prefill_s"]
        r["decode_vs_unwrapped"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["attention_memory_mib"] = max(0.0, r["extra_peak_rss_mib"] - base["extra_peak_rss_mib"])
    var, ref = results["var"], results["var_reference"]
    return {
        "benchmark": "attention",
        "variant": variant,
        "runs": runs,
        "decode_steps": decode_steps,
        "results": results,
        "checks": {
            "var_prefill_vs_unwrapped": var["prefill_vs_unwrapped"],
            "var_speedup_vs_eager_reference": ref["prefill_s"] / var["prefill_s"],
            "var_attention_memory_ratio_reference_over_fast": (
                ref["attention_memory_mib"] / var["attention_memory_mib"] if var["attention_memory_mib"] > 0 else None
            ),
            "var_decode_vs_unwrapped": var["decode_vs_unwrapped"],
        },
        "targets": {
            "var_prefill_vs_unwrapped": "<= 1.5",
            "var_speedup_vs_eager_reference": ">= 3",
            "attention memory": ">= 10x less than the reference",
            "var_decode_vs_unwrapped": ">= 0.8",
        },
    }


if __name__ == "__main__":
    name, variant, runs, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(run_condition(name, variant, runs, steps)))
