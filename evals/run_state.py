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


# the command-line flag that sets each recorded setting, so a refused resume can say what to pass
FLAGS = {
    "model": "--model",
    "data": "--questions / --coco-annotations",
    "prompt_suffix": "--prompt-suffix",
    "limit": "--limit",
    "n_images": "--n-images",
    "seed": "--seed",
    "prompt": "--prompt",
    "max_new_tokens": "--max-new-tokens",
    "dtype": "--dtype",
    "device": "--device",
    "attn_implementation": "--attn-implementation",
}


def generation_settings(model: Any, max_new_tokens: int) -> dict[str, Any]:
    """What changes the generated text besides the data and the methods: recorded so a resume cannot mix them."""
    param = next(model.parameters())
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {
        "max_new_tokens": max_new_tokens,
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": param.device.type,
        "attn_implementation": getattr(text_config, "_attn_implementation", None),
    }


def claim_out_dir(out_dir: Path, identity: dict[str, Any]) -> None:
    """Record the run's identity and settings; refuse a folder that holds a different run, naming what differs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_FILE
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); delete it only if {out_dir} holds no results") from exc
        if previous != identity:
            raise ValueError(_mismatch(out_dir, previous, identity))
        return
    write_json_atomic(path, identity)


def _mismatch(out_dir: Path, previous: dict[str, Any], identity: dict[str, Any]) -> str:
    diffs = []
    for key in sorted(set(previous) | set(identity)):
        if previous.get(key) != identity.get(key):
            was = "not recorded" if key not in previous else repr(previous[key])
            flag = FLAGS.get(key, key)
            diffs.append(f"{key} (this run {identity.get(key)!r}, the folder's {was}; flag {flag})")
    return (
        f"{out_dir} holds a run with different settings: {'; '.join(diffs)}. Resuming would mix records made "
        f"under both; rerun with the folder's settings to resume it (see {out_dir / RUN_FILE}), or pass a new --out"
    )


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
