"""Run the lvlm-steer command line from a checkout: ``python cli.py ...`` (same code as the ``lvlm-steer`` script)."""

from lvlm_steer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
