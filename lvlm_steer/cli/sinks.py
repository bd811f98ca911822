"""``sinks``: a model's sink (massive-activation) dimensions, the input VAR needs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lvlm_steer.cli.common import add_model_args, chat_inputs, load, load_image


def register(sub: argparse._SubParsersAction) -> None:
    sk = sub.add_parser("sinks", help="find a model's sink (massive-activation) dimensions for VAR")
    add_model_args(sk)
    sk.add_argument("--image", default="random")
    sk.add_argument("--prompt", default="Describe the image.")
    sk.add_argument("--out", type=Path, help="write the report JSON here")
    sk.set_defaults(handler=lambda args: print(cmd_sinks(args)))


def cmd_sinks(args: argparse.Namespace) -> str:
    from lvlm_steer.sinks import find_sink_dims, format_sink_report

    model, processor = load(args)
    report = find_sink_dims(model, chat_inputs(processor, load_image(args.image), args.prompt))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report.to_json() if hasattr(report, "to_json") else json.dumps(report))
    return format_sink_report(report)
