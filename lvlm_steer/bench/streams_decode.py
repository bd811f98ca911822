"""Quick measurement of the streams engine's decode cost (not a timed test; issue 17 will add `bench decoding`).

``python -m lvlm_steer.bench.streams_decode [--variant small|full] [--new-tokens 32] [--repeats 3]``
prints, for the benchmark model at batch 1, the median prefill time and decode time per token of: plain
``generate``; one auxiliary stream joined into the same forward (text-only, and a same-length stream that stands in
for VCD's distorted image); the same streams run sequentially (their own forward per step). Runs are interleaved.
Decode per token = (time of generate with N+1 new tokens - time with 1 new token) / N. Times are this process's CPU
time (``time.process_time``) on one torch thread, so that other jobs on a shared machine inflate them less than
wall-clock time; ``--wall`` measures wall-clock time instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import lvlm_steer as ls
from lvlm_steer.bench.model import benchmark_image, benchmark_model
from lvlm_steer.streams import AuxStream, TextOnly, generate_with_streams, neutral_combine

SAME = AuxStream("same", lambda adapter, inputs: dict(inputs))  # same length as the main stream (VCD-like cost)
TEXT = AuxStream("text", TextOnly())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="small")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of process CPU time")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.wall else time.process_time
    torch.set_num_threads(1)
    model, processor, description = benchmark_model(args.variant)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(images=[[benchmark_image()]], text=[prompt], return_tensors="pt"))
    conditions = {
        "plain": None,
        "joined_text_only": (TEXT, True),
        "joined_same_length": (SAME, True),
        "sequential_text_only": (TEXT, False),
        "sequential_same_length": (SAME, False),
    }
    times: dict[str, dict[int, list[float]]] = {name: {1: [], args.new_tokens + 1: []} for name in conditions}

    def run(condition, new_tokens: int) -> float:
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        start = clock()
        with torch.inference_mode():
            if condition is None:
                model.generate(**inputs, **options)
            else:
                stream, join = condition
                with ls.steer(model) as steering:
                    generate_with_streams(steering, {**inputs, **options}, [stream], neutral_combine, join=join)
        return clock() - start

    run(None, 2)  # warm-up
    for _ in range(args.repeats):
        for name, condition in conditions.items():
            for n in times[name]:
                times[name][n].append(run(condition, n))
    n = args.new_tokens
    report: dict[str, Any] = {
        "model": description["name"],
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "clock": "wall" if args.wall else "process CPU, 1 thread",
        "new_tokens": n,
        "repeats": args.repeats,
    }
    plain_decode = None
    for name, by_n in times.items():
        prefill = statistics.median(by_n[1])
        decode = (statistics.median(by_n[n + 1]) - prefill) / n
        plain_decode = decode if name == "plain" else plain_decode
        report[name] = {"prefill_s": round(prefill, 4), "decode_ms_per_token": round(1000 * decode, 2)}
        report[name]["decode_vs_plain"] = round(decode / plain_decode, 2)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
