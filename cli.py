"""Run the lvlm-steer command line from a checkout: ``python cli.py ...`` (same code as the ``lvlm-steer`` script)."""

import os
import sys

# This folder holds kernels/, hooks/ and evals/, installed as lvlm_steer.*; on sys.path they would pass for
# top-level packages (kernels/ for the Hugging Face `kernels` package that transformers >= 5.25 imports).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from lvlm_steer.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
