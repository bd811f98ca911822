"""The command line, run as users run it: ``python cli.py`` from the checkout and the ``lvlm-steer`` script."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lvlm_steer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_models_and_methods_listings(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for model_type in (
        "llava",
        "llava_next",
        "llava_onevision",
        "qwen2_vl",
        "qwen2_5_vl",
        "idefics3",
        "smolvlm",
        "gemma3",
        "paligemma",
        "internvl",
        "mistral3",
    ):
        assert f"\n{model_type} " in out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ablate  (AblateHeads)" in out and "scale  (ScaleHeads)" in out
    assert re.search(r"\n    mode +default zero +zero \| mean", out)


def test_generate_with_and_without_method():
    proc = run_cli(
        "generate",
        "--model",
        "tiny:qwen2_vl",
        "--image",
        "random",
        "--prompt",
        "What is this?",
        "--method",
        "ablate:heads=0.1,1.2,mode=mean",
        "--max-new-tokens",
        "4",
        "--compare",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["methods"] == "ablate:heads=0.1,1.2,mode=mean"
    assert isinstance(result["none"], str) and isinstance(result["steered"], str)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "ablate:heads=9.0"], "layer 9 is out of range"),
        (["--method", "frobnicate"], "unknown method 'frobnicate'"),
        (["--model", "tiny:llama"], "unknown tiny architecture 'llama'"),
        (["--model", "builtin:testbd"], "the built-in models are builtin:testbed, builtin:testbed-smollm2"),
        (["--image", "/nonexistent.png"], "image file '/nonexistent.png' not found"),
    ],
)
def test_generate_bad_input_exits_2_with_message(args, message, capsys):
    base = {"--model": "tiny:llava", "--image": "random", "--prompt": "hi"}
    extra = []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    argv = ["generate", *[x for kv in base.items() for x in kv], "--max-new-tokens", "2", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("lvlm-steer") or str(Path(sys.executable).parent / "lvlm-steer")
    if not Path(script).exists():
        pytest.skip("package not installed with its console script (pip install -e .)")
    proc = subprocess.run([script, "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "idefics3" in proc.stdout


def test_sinks_command_reports_and_saves(tmp_path, capsys):
    out = tmp_path / "sinks.json"
    assert main(["sinks", "--model", "tiny:llava", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "dims" in report and report["dims"] == []  # a random model has no massive activations
    assert printed.strip()


def test_every_command_dispatches_to_a_handler_and_runs_as_a_module():
    from lvlm_steer.cli import build_parser

    commands = [
        ["generate", "--image", "random", "--prompt", "hi"],
        ["methods"],
        ["models"],
        ["demo"],
        ["eval", "pope", "--images", "i", "--questions", "q", "--out", "o"],
        ["eval", "chair", "--images", "i", "--coco-annotations", "a", "--out", "o"],
        ["calibrate", "act", "--images", "i", "--questions", "q", "--out", "o"],
        ["heads", "scan", "--images", "i", "--prompt", "p", "--out", "o"],
        ["heads", "ablate", "--heads", "1.2", "--image", "random", "--prompt", "p"],
        ["sinks"],
        ["pope", "build", "--coco-annotations", "a", "--out", "o"],
        ["report", "run"],
        *(["bench", name] for name in ("overhead", "attention", "vhr-carve", "pruning", "eval")),
    ]
    for argv in commands:
        assert callable(build_parser().parse_args(argv).handler), argv
    proc = subprocess.run(
        [sys.executable, "-m", "lvlm_steer.cli", "models"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "idefics3" in proc.stdout, proc.stderr
