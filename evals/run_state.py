"""What an output folder records about its run, so that a rerun resumes the same run or refuses clearly."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from lvlm_steer.evals.io import write_json_atomic

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


def claim_out_dir(out_dir: Path, identity: dict[str, Any]) -> None:
    """Record the run's identity (task, model, data hashes); refuse a folder that holds a different run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != identity:
            changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(
                f"{out_dir} holds a run with different {', '.join(changed)}; resume only the same run there, "
                "or pass a new --out"
            )
        return
    write_json_atomic(path, identity)


def versions() -> dict[str, str]:
    import torch
    import transformers

    import lvlm_steer

    return {
        "lvlm_steer": lvlm_steer.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_summary(out_dir: Path, summary: dict[str, Any], started: float) -> dict[str, Any]:
    summary = {**summary, "versions": versions(), "wall_time_s": round(time.time() - started, 2)}
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    return summary
