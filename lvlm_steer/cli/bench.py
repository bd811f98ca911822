"""``bench ...``: the benchmarks on the benchmark model, as JSON (printed, and written with ``--out``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks on the benchmark model (JSON out)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    over = bench_sub.add_parser("overhead", help="throughput of unwrapped vs steer() vs AblateHeads(10 heads)")
    over.add_argument("--variant", default="full", choices=["full", "small"])
    over.add_argument("--runs", type=int, default=3)
    over.add_argument("--new-tokens", type=int, default=32)
    over.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    batt = bench_sub.add_parser("attention", help="VAR (fast, eager reference), ACT, PAI vs unwrapped sdpa")
    batt.add_argument("--variant", default="full", choices=["full", "small"])
    batt.add_argument("--runs", type=int, default=3)
    batt.add_argument("--decode-steps", type=int, default=64)
    batt.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    bvc = bench_sub.add_parser("vhr-carve", help="seconds per sample: baseline greedy vs VHR vs CARVE")
    bvc.add_argument("--variant", default="full", choices=["full", "small"])
    bvc.add_argument("--runs", type=int, default=3)
    bvc.add_argument("--new-tokens", type=int, default=32)
    bvc.add_argument("--capture-steps", type=int, default=32, help="CARVE's captured steps per prompt")
    bvc.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    bpr = bench_sub.add_parser("pruning", help="FastV and VTC-CLS vs unwrapped: prefill, decode, memory, FLOPs")
    bpr.add_argument("--model", action="append", default=None, help="bench, bench:small, llava15 (default: both full)")
    bpr.add_argument("--runs", type=int, default=3)
    bpr.add_argument("--new-tokens", type=int, default=16)
    bpr.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    bev = bench_sub.add_parser("eval", help="POPE questions/s: the eval runner vs a bare generate loop")
    bev.add_argument("--model", action="append", default=None, help="model specs (default: tiny:llava and bench)")
    bev.add_argument("--batch-size", action="append", type=int, default=None, help="default: 1 and 8")
    bev.add_argument("--questions", type=int, default=16)
    bev.add_argument("--runs", type=int, default=3)
    bev.add_argument("--max-new-tokens", type=int, default=4)
    bev.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    bench.set_defaults(handler=print_bench)


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.bench == "overhead":
        from lvlm_steer.bench.overhead import run_overhead

        return run_overhead(args.variant, args.runs, args.new_tokens, progress=progress)
    if args.bench == "vhr-carve":
        from lvlm_steer.bench.vhr_carve import run_vhr_carve_bench

        return run_vhr_carve_bench(args.variant, args.runs, args.new_tokens, args.capture_steps, progress=progress)
    if args.bench == "attention":
        from lvlm_steer.bench.attention import run_attention_bench

        return run_attention_bench(args.variant, args.runs, args.decode_steps, progress=progress)
    if args.bench == "pruning":
        from lvlm_steer.bench.pruning import DEFAULT_MODELS, run_pruning_bench

        return run_pruning_bench(args.model or DEFAULT_MODELS, args.runs, args.new_tokens, progress=progress)
    from lvlm_steer.bench.eval_overhead import run_eval_bench

    return run_eval_bench(
        args.model or ["tiny:llava", "bench"],
        args.batch_size or [1, 8],
        args.questions,
        args.runs,
        args.max_new_tokens,
        progress=progress,
    )


def print_bench(args: argparse.Namespace) -> None:
    text = json.dumps(cmd_bench(args), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
