"""The ``lvlm-steer`` command line: argument parsing and printing only; the work is in the Python API.

One module per command group registers its sub-commands, each with a ``handler``; `main` parses, dispatches to
the handler, and turns the errors a user can cause into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from lvlm_steer.cli import bench, calibrate, evals, generate, heads, pope, report, sinks
from lvlm_steer.cli.common import parse_layers
from lvlm_steer.errors import SteeringError

# the command groups, in the order `lvlm-steer --help` lists them
COMMAND_GROUPS = (generate, evals, calibrate, heads, sinks, pope, report, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlm-steer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (SteeringError, ValueError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished record is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def one_line(exc: BaseException) -> str:
    """The error as one line that names the file: ``[Errno 28] No space left on device: 'out/x'`` becomes
    ``out/x: No space left on device``; a message of several lines keeps its first."""
    if isinstance(exc, OSError) and exc.filename is not None:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
        return f"{where}: {exc.strerror or exc}"
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


__all__ = ["build_parser", "main", "one_line", "parse_layers"]
