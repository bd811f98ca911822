"""The ``lvlm-steer`` command line: argument parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lvlm_steer as ls
from lvlm_steer.errors import SteeringError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlm-steer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an answer for one image, with and without methods")
    _model_args(gen)
    gen.add_argument("--image", required=True, help="image file (use 'random' for a generated test image)")
    gen.add_argument("--prompt", required=True, help="the user's question or instruction")
    gen.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="method spec, e.g. ablate:heads=14.3,14.5,mode=mean (repeat to combine)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--compare", action="store_true", help="also print the unsteered answer")
    gen.add_argument("--json", action="store_true", help="print JSON instead of text")

    sub.add_parser("methods", help="list methods with their parameters and defaults")
    sub.add_parser("models", help="list supported architectures")

    bench = sub.add_parser("bench", help="benchmarks on the benchmark model (JSON out)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    over = bench_sub.add_parser("overhead", help="throughput of unwrapped vs steer() vs AblateHeads(10 heads)")
    over.add_argument("--variant", default="full", choices=["full", "small"])
    over.add_argument("--runs", type=int, default=3)
    over.add_argument("--new-tokens", type=int, default=32)
    over.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="path or Hub id, tiny:<arch> (random test model), or bench[:small]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn-implementation", default=None, help="sdpa (default), eager, or flash_attention_2")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lvlm_steer.loading import load_model

    methods = ls.parse_specs(args.method)  # parse before the (slow) load so a typo fails fast
    model, processor = load_model(args.model, args.device, args.dtype, args.attn_implementation, args.trust_remote_code)
    image = _load_image(args.image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(args.device)

    def run() -> str:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    result: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
    if args.compare or not methods:
        result["none"] = run()
    if methods:
        with ls.steer(model, *methods, processor=processor) as steered:
            result["methods"] = steered.describe()
            result["steered"] = run()
    return result


def _load_image(path: str):
    from PIL import Image

    if path == "random":
        from lvlm_steer.bench.model import benchmark_image

        return benchmark_image(size=224)
    file = Path(path)
    if not file.is_file():
        raise SteeringError(f"image file {path!r} not found (pass --image random for a generated test image)")
    return Image.open(file).convert("RGB")


def cmd_methods() -> str:
    lines = []
    for name in ls.method_names():
        cls = ls.method_class(name)
        lines.append(f"{name}  ({cls.__name__}): {cls.summary}")
        if cls.paper:
            lines.append(f"    source: {cls.paper}")
        for pname, default, help_text in cls.parameters():
            lines.append(f"    {pname:<10} default {default:<10} {help_text}")
    lines.append("none  no method (the unsteered baseline)")
    return "\n".join(lines)


def cmd_models() -> str:
    rows = [f"{t:<16} {name}" for t, name in sorted(ls.supported_architectures().items())]
    return "model_type       architecture\n" + "\n".join(rows) + "\n\nTest models: --model tiny:<model_type>"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            result = cmd_generate(args)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                for key in ("none", "steered"):
                    if key in result:
                        label = "none" if key == "none" else result["methods"]
                        print(f"[{label}] {result[key]}")
        elif args.command == "methods":
            print(cmd_methods())
        elif args.command == "models":
            print(cmd_models())
        elif args.command == "bench":
            from lvlm_steer.bench.overhead import run_overhead

            report = run_overhead(
                args.variant, args.runs, args.new_tokens, progress=lambda msg: print(msg, file=sys.stderr, flush=True)
            )
            text = json.dumps(report, indent=2)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(text + "\n")
            print(text)
    except SteeringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
