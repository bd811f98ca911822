"""`lvlm-steer bench attention`: VAR (fast and eager reference), ACT and PAI against unwrapped sdpa.

Each condition lives in its own worker process (so peak memory is that condition's alone): the benchmark model,
one ~1.2k-token prompt, prefill then `decode_steps` greedy steps. The workers are started together and then
driven one repeat at a time in interleaved, rotating rounds (`lvlm_steer.bench.timing`), after a warm-up repeat
of each, so a change of machine load hits every condition alike instead of showing up as a ratio. Reported:
min/median/max per condition of prefill time and decode tokens/s, ratios to the unwrapped model as medians of
per-round ratios with their range (marked unreliable when the range is wider than the effect), and the peak
resident memory over what each worker held after its warm-up ("extra" memory; the unwrapped worker's extra is
the baseline for attention memory).

The benchmark model has random weights, so it has no real massive activations: VAR gets explicit sink dimensions
(the work per edited row does not depend on how many keys are sinks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import Any

CONDITIONS = ("unwrapped", "var", "var_reference", "act", "pai")
METRICS = ("prefill_s", "decode_tokens_per_s")


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


def serve_condition(name: str, variant: str, decode_steps: int, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Worker loop: build the model for one condition, then answer ``run`` (one timed repeat, JSON), ``memory``
    (extra peak memory since the first repeat, JSON) and ``quit`` commands, one per line."""
    import logging

    import torch

    import lvlm_steer as ls
    from lvlm_steer.bench.model import benchmark_inputs, benchmark_model
    from lvlm_steer.bench.timing import ForwardTimer, reset_peak_rss, rss_mib

    logging.getLogger("lvlm_steer").setLevel(logging.ERROR)
    model, processor, description = benchmark_model(variant)
    inputs = benchmark_inputs(processor)
    methods = _methods(name)
    if name == "var_reference":
        model.set_attn_implementation({"text_config": "eager"})  # the official setting: materialised attention
    before = None

    def reply(data: dict[str, Any]) -> None:
        stdout.write(json.dumps(data) + "\n")
        stdout.flush()

    reply({"ready": name, "model": description["name"], "prompt_tokens": int(inputs["input_ids"].shape[1])})
    for line in stdin:
        command = line.strip()
        if command == "quit":
            return
        if command == "memory":
            reply({"extra_peak_rss_mib": rss_mib("VmHWM") - before if before is not None else float("nan")})
            continue
        steering = ls.steer(model, *methods, processor=processor) if methods is not None else None
        try:
            with ForwardTimer(model) as timer, torch.inference_mode():
                model.generate(
                    **inputs, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1, do_sample=False
                )
        finally:
            if steering is not None:
                steering.remove()
        decode = timer.durations[1:]
        reply({"prefill_s": timer.durations[0], "decode_tokens_per_s": len(decode) / sum(decode)})
        if before is None:  # after the first repeat (the warm-up: imports, allocator pools) memory is measured
            reset_peak_rss()
            before = rss_mib()


class Worker:
    """One condition's worker process, driven line by line."""

    def __init__(self, name: str, variant: str, decode_steps: int) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "lvlm_steer.bench.attention", name, variant, str(decode_steps)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.info: dict[str, Any] = {}

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"bench attention: condition {self.name} failed:\n{self.log.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def run_attention_bench(variant: str = "full", runs: int = 3, decode_steps: int = 64, progress=print) -> dict:
    from lvlm_steer.bench.timing import compare, interleaved, ratio_spread, unreliable_ratios

    start = time.perf_counter()
    workers = {name: Worker(name, variant, decode_steps) for name in CONDITIONS}
    try:
        for w in workers.values():
            w.info = w.read()  # ready
        progress(f"workers ready ({time.perf_counter() - start:.0f} s); warm-up: {', '.join(CONDITIONS)}")

        def report(name: str, round_index: int, r: dict[str, float]) -> None:
            progress(
                f"round {round_index}/{runs} {name}: prefill {r['prefill_s']:.2f} s, "
                f"decode {r['decode_tokens_per_s']:.2f} tok/s ({time.perf_counter() - start:.0f} s)"
            )

        samples = interleaved(list(CONDITIONS), runs, lambda name: workers[name].ask("run"), progress=report)
        memory = {name: w.ask("memory")["extra_peak_rss_mib"] for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    comparison = compare(samples, "unwrapped", METRICS)
    results: dict[str, dict[str, Any]] = {}
    for name in CONDITIONS:
        entry = comparison[name]
        results[name] = {
            "condition": name,
            "model": workers[name].info["model"],
            "prompt_tokens": workers[name].info["prompt_tokens"],
            "prefill_s": entry["prefill_s"]["median"],
            "decode_tokens_per_s": entry["decode_tokens_per_s"]["median"],
            "prefill_runs": [r["prefill_s"] for r in samples[name]],
            "decode_runs": [r["decode_tokens_per_s"] for r in samples[name]],
            "extra_peak_rss_mib": memory[name],
            "prefill_vs_unwrapped": entry["prefill_s"].get("vs_unwrapped", {"ratio": 1.0})["ratio"],
            "decode_vs_unwrapped": entry["decode_tokens_per_s"].get("vs_unwrapped", {"ratio": 1.0})["ratio"],
            "attention_memory_mib": max(0.0, memory[name] - memory["unwrapped"]),
        }
    var, ref = results["var"], results["var_reference"]
    speedup = ratio_spread(ref["prefill_runs"], var["prefill_runs"])  # per round: reference time / fast time
    return {
        "benchmark": "attention",
        "variant": variant,
        "runs": runs,
        "decode_steps": decode_steps,
        "results": results,
        "spread": comparison | {"var_speedup_vs_eager_reference": speedup},
        "unreliable": unreliable_ratios(comparison) + ["var_speedup_vs_eager_reference"] * speedup["unreliable"],
        "checks": {
            "var_prefill_vs_unwrapped": var["prefill_vs_unwrapped"],
            "var_speedup_vs_eager_reference": speedup["ratio"],
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
    serve_condition(sys.argv[1], sys.argv[2], int(sys.argv[3]))
