"""``eval pope`` and ``eval chair``: the hallucination evals over a folder of images, one or more conditions."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lvlm_steer.cli.common import add_model_args, load, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="hallucination evals (POPE, CHAIR) with one or more methods")
    ev_sub = ev.add_subparsers(dest="task", required=True)
    pope = ev_sub.add_parser("pope", help="POPE yes/no object questions")
    add_model_args(pope)
    _eval_args(pope, batch_size=8, max_new_tokens=16)
    pope.add_argument(
        "--questions",
        action="append",
        required=True,
        metavar="FILE",
        help="POPE question file (JSON lines or JSON array); repeat for several splits",
    )
    pope.add_argument("--parser", default="pope", help="answer parser: pope (official), vcd, lmms, vlmeval, words")
    pope.add_argument("--prompt-suffix", default=None, help="text after each question (default: the common one)")
    pope.add_argument("--limit", type=positive_int, default=None, help="first N questions of each file (quick runs)")
    chair = ev_sub.add_parser("chair", help="CHAIR object hallucination in image captions")
    add_model_args(chair)
    _eval_args(chair, batch_size=8, max_new_tokens=512)
    chair.add_argument("--coco-annotations", required=True, help="folder with instances_*.json (+ captions_*.json)")
    chair.add_argument("--n-images", type=positive_int, default=500)
    chair.add_argument("--seed", type=int, default=0)
    chair.add_argument("--prompt", default=None, help="caption prompt (default: the CHAIR protocol's)")
    chair.add_argument(
        "--chair-rules",
        choices=("official", "fixed"),
        default="official",
        help="mention rules: official (as published) or fixed (ours)",
    )
    ev.set_defaults(handler=print_eval)


def _eval_args(p: argparse.ArgumentParser, batch_size: int, max_new_tokens: int) -> None:
    p.add_argument("--images", required=True, help="folder of the images the questions name (e.g. coco/val2014)")
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="a condition to evaluate: none, or method specs joined by + (repeat for several)",
    )
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--out", type=Path, required=True, help="output folder; rerunning with it resumes")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out items whose image is missing or unreadable (counted in the summary)",
    )
    p.add_argument("--no-progress", action="store_true")


def check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be checked without the model, so a typo fails in seconds, not after a long load:
    the other processes of a launch, the question or annotation files, the images, and ``--out``."""
    from lvlm_steer.evals.out_dir import check_not_busy, prepare_out_dir
    from lvlm_steer.evals.shards import join_shards

    shard = join_shards()
    if args.task == "pope":
        from lvlm_steer.evals.pope_eval import pope_items

        pope_items(args.questions, args.images, skip_missing=args.skip_missing, limit=args.limit)
    else:
        from lvlm_steer.evals.chair import DEFAULT_CHAIR_PROMPT
        from lvlm_steer.evals.chair_eval import chair_items, find_annotations

        instances, _ = find_annotations(args.coco_annotations)
        chair_items(instances, args.images, args.n_images, args.seed, DEFAULT_CHAIR_PROMPT, args.skip_missing)
    check_not_busy(prepare_out_dir(args.out), shard.rank, shard.world)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any] | None:
    from lvlm_steer.evals.runner import parse_conditions

    conditions = parse_conditions(args.method)  # before the slow model load, so a typo fails fast
    check_inputs(args)
    model, processor = load(args)
    common = dict(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        skip_missing=args.skip_missing,
        progress=not args.no_progress,
    )
    if args.task == "pope":
        from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX
        from lvlm_steer.evals.pope_eval import evaluate_pope

        suffix = DEFAULT_PROMPT_SUFFIX if args.prompt_suffix is None else args.prompt_suffix
        return evaluate_pope(
            model,
            processor,
            args.model,
            args.questions,
            args.images,
            conditions,
            args.out,
            parser=args.parser,
            prompt_suffix=suffix,
            limit=args.limit,
            **common,
        )
    from lvlm_steer.evals.chair import DEFAULT_CHAIR_PROMPT
    from lvlm_steer.evals.chair_eval import evaluate_chair

    return evaluate_chair(
        model,
        processor,
        args.model,
        args.coco_annotations,
        args.images,
        conditions,
        args.out,
        n_images=args.n_images,
        seed=args.seed,
        prompt=args.prompt or DEFAULT_CHAIR_PROMPT,
        chair_rules=args.chair_rules,
        **common,
    )


def print_eval(args: argparse.Namespace) -> None:
    if cmd_eval(args) is not None:  # None on ranks other than 0
        from lvlm_steer.evals.report import build_report, to_markdown

        print(to_markdown(build_report([args.out])))
