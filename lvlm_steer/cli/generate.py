"""``generate`` (one image, with and without methods), ``methods``, ``models`` and ``demo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lvlm_steer as ls
from lvlm_steer.cli.common import add_model_args, load, load_image, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate an answer for one image, with and without methods")
    add_model_args(gen)
    gen.add_argument("--image", required=True, help="image file (use 'random' for a generated test image)")
    gen.add_argument("--prompt", required=True, help="the user's question or instruction")
    gen.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="method spec, e.g. ablate:heads=14.3,14.5,mode=mean (repeat to combine)",
    )
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--compare", action="store_true", help="also print the unsteered answer")
    gen.add_argument("--json", action="store_true", help="print JSON instead of text")
    gen.set_defaults(handler=print_generate)

    sub.add_parser("methods", help="list methods with their parameters and defaults").set_defaults(
        handler=lambda args: print(methods_listing())
    )
    demo = sub.add_parser("demo", help="every method vs none on the built-in testbed (POPE + CHAIR), offline")
    demo.add_argument("--out", type=Path, default=Path("lvlm-steer-demo"), help="report and data folder")
    demo.add_argument("--limit", type=positive_int, default=None, help="questions per POPE split and CHAIR images")
    demo.add_argument("--method", action="append", default=None, metavar="SPEC", help="only these conditions")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--model", default="builtin:testbed", help="builtin:testbed (default) or builtin:testbed-smollm2")
    demo.set_defaults(handler=run_demo)
    sub.add_parser("models", help="list supported architectures").set_defaults(
        handler=lambda args: print(models_listing())
    )


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    methods = ls.parse_specs(args.method)  # parse before the (slow) load so a typo fails fast
    model, processor = load(args)
    image = load_image(args.image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(args.device)

    def run(steered: ls.Steering | None = None) -> str:
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        with torch.inference_mode():
            if steered is None:
                out = model.generate(**inputs, **kwargs)
            else:  # a multi-pass method (CARVE) may need the raw image and question
                out = steered.generate(**inputs, images=[image], questions=[args.prompt], **kwargs)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    result: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
    if args.compare or not methods:
        result["none"] = run()
    if methods:
        with ls.steer(model, *methods, processor=processor) as steered:
            result["methods"] = steered.describe()
            result["steered"] = run(steered)
    return result


def print_generate(args: argparse.Namespace) -> None:
    result = cmd_generate(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key in ("none", "steered"):
        if key in result:
            label = "none" if key == "none" else result["methods"]
            print(f"[{label}] {result[key]}")


def run_demo(args: argparse.Namespace) -> None:
    from lvlm_steer.demo import run_demo as demo

    demo(args.out, args.limit, args.method, progress=not args.no_progress, model=args.model)


def methods_listing() -> str:
    lines = []
    for name in ls.method_names():
        cls = ls.method_class(name)
        lines.append(f"{name}  ({cls.__name__}): {cls.summary}")
        if cls.paper:
            lines.append(f"    source: {cls.paper}")
        params = cls.parameters()
        name_width = max((len(p[0]) for p in params), default=0)
        value_width = max((len(p[1]) for p in params if len(p[1]) <= 16), default=0)
        for pname, default, help_text in params:
            lines.append(f"    {pname:<{name_width}}  default {default:<{value_width}}  {help_text}")
    lines.append("none  no method (the unsteered baseline)")
    return "\n".join(lines)


def models_listing() -> str:
    rows = [f"{t:<16} {name}" for t, name in sorted(ls.supported_architectures().items())]
    return "model_type       architecture\n" + "\n".join(rows) + "\n\nTest models: --model tiny:<model_type>"
