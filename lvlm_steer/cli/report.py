"""``report RUN...``: the side-by-side table and chart of eval output folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="side-by-side table and bar chart of eval runs")
    rep.add_argument("runs", nargs="+", help="eval output folders")
    rep.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md/.json/.png")
    rep.set_defaults(handler=print_report)


def print_report(args: argparse.Namespace) -> None:
    from lvlm_steer.evals.report import write_report

    paths = write_report(args.runs, args.out)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
