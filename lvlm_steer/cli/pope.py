"""``pope build``: random/popular/adversarial POPE question files from COCO annotations."""

from __future__ import annotations

import argparse
from pathlib import Path

from lvlm_steer.cli.common import positive_int


def register(sub: argparse._SubParsersAction) -> None:
    pb = sub.add_parser("pope", help="POPE question sets")
    pb_sub = pb.add_subparsers(dest="pope_command", required=True)
    build = pb_sub.add_parser("build", help="build random/popular/adversarial question files from COCO annotations")
    build.add_argument("--coco-annotations", required=True, help="instances_*.json, or the folder holding it")
    build.add_argument("--n-images", type=positive_int, default=500)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", type=Path, required=True)
    build.set_defaults(handler=lambda args: print(cmd_pope_build(args)))


def cmd_pope_build(args: argparse.Namespace) -> str:
    from lvlm_steer.evals.chair_eval import find_annotations
    from lvlm_steer.evals.pope import build_pope

    instances, _ = find_annotations(args.coco_annotations)
    sets = build_pope(instances, n_images=args.n_images, seed=args.seed, out_dir=args.out)
    return "\n".join(f"{args.out / f'coco_pope_{split}.json'}: {len(qs)} questions" for split, qs in sets.items())
