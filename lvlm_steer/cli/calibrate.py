"""``calibrate act``: choose ACT's heads on labelled yes/no questions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lvlm_steer.cli.common import add_model_args, load, parse_layers, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate", help="choose a method's heads on labelled data")
    cal_sub = cal.add_subparsers(dest="calibrate", required=True)
    act = cal_sub.add_parser("act", help="ACT heads: accuracy with vs without calibrating each head alone")
    add_model_args(act)
    act.add_argument("--images", required=True)
    act.add_argument("--questions", action="append", required=True, metavar="FILE", help="labelled yes/no questions")
    act.add_argument("--layers", default=None, help="candidate layers, e.g. 2-30 or 4,5,6 (default 2..L-2)")
    act.add_argument("--limit", type=positive_int, default=None, help="first N questions of each file")
    act.add_argument("--beta", type=float, default=0.4)
    act.add_argument("--threshold", type=float, default=0.1)
    act.add_argument("--batch-size", type=positive_int, default=8)
    act.add_argument("--out", type=Path, required=True, help="JSON with the head list and every head's score")
    act.add_argument("--no-progress", action="store_true")
    act.set_defaults(handler=print_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    from lvlm_steer.evals.calibrate import calibrate_act

    model, processor = load(args)
    return calibrate_act(
        model,
        processor,
        args.questions,
        args.images,
        args.out,
        layers=parse_layers(args.layers),
        beta=args.beta,
        threshold=args.threshold,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def print_calibrate(args: argparse.Namespace) -> None:
    result = cmd_calibrate(args)
    print(
        f"baseline accuracy {result['baseline_accuracy']:.3f}; heads with a gain: "
        f"{sum(map(len, result['heads'].values()))} -> {args.out} (use act:heads=@{args.out})"
    )
