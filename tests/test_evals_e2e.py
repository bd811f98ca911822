"""End to end on synthetic COCO data: pope build -> eval pope (two methods) -> report; eval chair; resume after a
crash equals an uninterrupted run; two processes under accelerate merge into one result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _model

import lvlm_steer.evals.runner as runner_module
from lvlm_steer.cli import main
from lvlm_steer.evals.chair_eval import evaluate_chair
from lvlm_steer.evals.io import read_jsonl
from lvlm_steer.evals.pope import build_pope
from lvlm_steer.evals.pope_eval import evaluate_pope
from lvlm_steer.evals.report import write_report
from lvlm_steer.evals.runner import parse_conditions
from lvlm_steer.testing.coco import make_coco

METHODS = ["none", "ablate:heads=0.1,1.2", "scale:heads=1.0@3+ablate:heads=2.3"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    data = make_coco(root, n_images=6, seed=0)
    pope_dir = root / "pope"
    build_pope(data["instances"], n_images=4, seed=0, out_dir=pope_dir)
    return data, pope_dir


def _answers(out_dir: Path) -> list[tuple]:
    return [(r["method"], r["id"], r["answer"]) for r in read_jsonl(out_dir / "results.jsonl")]


def test_pope_eval_and_report(coco, tmp_path):
    data, pope_dir = coco
    model, processor = _model("llava")
    out = tmp_path / "pope"
    files = [pope_dir / "coco_pope_random.json", pope_dir / "coco_pope_adversarial.json"]
    summary = evaluate_pope(
        model,
        processor,
        "tiny:llava",
        files,
        data["images_dir"],
        parse_conditions(METHODS),
        out,
        batch_size=4,
        max_new_tokens=3,
        progress=False,
    )
    records = list(read_jsonl(out / "results.jsonl"))
    assert len(records) == 3 * 2 * 24  # 3 conditions x 2 splits x (4 images x 6 questions)
    combined = "scale:heads=1.0@3+ablate:heads=2.3"
    assert {r["method"] for r in records} == {"none", "ablate:heads=0.1,1.2", combined}
    assert all(r["prediction"] in ("yes", "no", "unknown") for r in records)
    assert set(summary["metrics"]["none"]) == {"random", "adversarial", "overall"}
    assert summary["data"][0]["sha256"] and summary["versions"]["transformers"]
    paths = write_report([out], tmp_path / "report")
    table = paths["markdown"].read_text()
    assert "`ablate:heads=0.1,1.2`" in table and "adversarial" in table
    from PIL import Image

    assert Image.open(paths["png"]).size[0] > 500
    json.loads(paths["json"].read_text())


def test_resume_after_crash_equals_uninterrupted_run(coco, tmp_path, monkeypatch):
    data, pope_dir = coco
    model, processor = _model("qwen2_vl")
    files = [pope_dir / "coco_pope_popular.json"]
    conditions = parse_conditions(["none", "ablate:heads=0.1,mode=mean"])
    kwargs = dict(batch_size=4, max_new_tokens=3, progress=False)
    evaluate_pope(model, processor, "tiny:qwen2_vl", files, data["images_dir"], conditions, tmp_path / "full", **kwargs)

    calls = {"n": 0}
    real = runner_module.Runner._generate

    def crashing(self, steering, inputs):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-way through the second condition
            raise KeyboardInterrupt
        return real(self, steering, inputs)

    monkeypatch.setattr(runner_module.Runner, "_generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        evaluate_pope(
            model, processor, "tiny:qwen2_vl", files, data["images_dir"], conditions, tmp_path / "cut", **kwargs
        )
    partial = _answers(tmp_path / "cut")
    assert 0 < len(partial) < len(_answers(tmp_path / "full"))
    assert not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(runner_module.Runner, "_generate", real)
    evaluate_pope(model, processor, "tiny:qwen2_vl", files, data["images_dir"], conditions, tmp_path / "cut", **kwargs)
    assert _answers(tmp_path / "cut") == _answers(tmp_path / "full")
    # a third run has nothing left to do and changes nothing
    evaluate_pope(model, processor, "tiny:qwen2_vl", files, data["images_dir"], conditions, tmp_path / "cut", **kwargs)
    assert _answers(tmp_path / "cut") == _answers(tmp_path / "full")


def test_chair_eval(coco, tmp_path):
    data, _ = coco
    model, processor = _model("idefics3")
    summary = evaluate_chair(
        model,
        processor,
        "tiny:idefics3",
        Path(data["instances"]).parent,
        data["images_dir"],
        parse_conditions(["none", "scale:heads=0.0@0.5"]),
        tmp_path / "chair",
        n_images=4,
        batch_size=2,
        max_new_tokens=6,
        progress=False,
    )
    for label in ("none", "scale:heads=0.0@0.5"):
        m = summary["metrics"][label]
        assert m["n_captions"] == 4 and 0.0 <= m["chair_i"] <= 1.0 and 0.0 <= m["chair_s"] <= 1.0
    assert summary["config"]["ground_truth"] == "instances + reference captions"


def test_bad_eval_input(coco, tmp_path, capsys):
    data, pope_dir = coco
    base = ["eval", "pope", "--model", "tiny:llava", "--images", str(data["images_dir"]), "--no-progress"]
    q = str(pope_dir / "coco_pope_random.json")
    assert main([*base, "--questions", q, "--method", "frob", "--out", str(tmp_path / "a")]) == 2
    assert "unknown method 'frob'" in capsys.readouterr().err
    assert main([*base, "--questions", str(tmp_path / "nope.json"), "--out", str(tmp_path / "b")]) == 2
    assert "nope.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    line = '{"question_id": 1, "image": "%s", "text": "Is there a cat in the image?", "label": "yes"}\n'
    bad.write_text(line % "x.jpg" + "{oops\n")
    assert main([*base, "--questions", str(bad), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "line 2" in err, err
    missing = tmp_path / "missing.json"
    missing.write_text(line % "absent.jpg")
    assert main([*base, "--questions", str(missing), "--out", str(tmp_path / "d")]) == 2
    assert "absent.jpg" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert main([*base, "--questions", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "empty" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_under_accelerate_merge(coco, tmp_path):
    data, pope_dir = coco
    out = tmp_path / "sharded"
    args = [
        "eval",
        "pope",
        "--model",
        "tiny:llava",
        "--images",
        str(data["images_dir"]),
        "--questions",
        str(pope_dir / "coco_pope_random.json"),
        "--method",
        "none",
        "--method",
        "ablate:heads=0.1",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lvlm_steer.cli",
    ]
    proc = subprocess.run([*launch, *args, "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("results.rank*")) and not list(out.glob("rank*.done"))
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    assert _answers(out) == _answers(single)
    assert json.loads((out / "summary.json").read_text())["counts"]["records"] == 48


def test_cli_pope_build_eval_report(coco, tmp_path, capsys):
    data, _ = coco
    pope_dir = tmp_path / "pope"
    assert (
        main(
            [
                "pope",
                "build",
                "--coco-annotations",
                str(Path(data["instances"]).parent),
                "--n-images",
                "3",
                "--seed",
                "1",
                "--out",
                str(pope_dir),
            ]
        )
        == 0
    )
    assert "coco_pope_adversarial.json: 18 questions" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (
        main(
            [
                "eval",
                "pope",
                "--model",
                "tiny:gemma3",
                "--images",
                str(data["images_dir"]),
                "--questions",
                str(pope_dir / "coco_pope_random.json"),
                "--method",
                "none",
                "--method",
                "ablate:heads=1.1",
                "--batch-size",
                "3",
                "--max-new-tokens",
                "2",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert "| random | `ablate:heads=1.1` |" in capsys.readouterr().out
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here not found: is" in capsys.readouterr().err


def test_cli_bench_eval_tiny(capsys):
    assert main(["bench", "eval", "--model", "tiny:llava", "--batch-size", "2", "--questions", "4", "--runs", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["results"]["tiny:llava"]["batch_2"]
    assert row["bare_questions_per_s"] > 0 and row["runner_questions_per_s"] > 0


def test_wilson_interval():
    from lvlm_steer.evals.report import wilson_interval

    lo, hi = wilson_interval(0.5, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3  # textbook value for 50/100
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(0.0, 10)[0] == 0.0
    assert wilson_interval(0.3, 0) == (0.0, 0.0)


def test_calibrate_act_writes_a_usable_head_list(coco, tmp_path):
    from lvlm_steer.evals.calibrate import calibrate_act

    data, pope_dir = coco
    model, processor = _model("llava")
    out = tmp_path / "act_heads.json"
    result = calibrate_act(
        model,
        processor,
        [pope_dir / "coco_pope_random.json"],
        data["images_dir"],
        out,
        layers=[1, 2],
        threshold=0.05,
        limit=6,
        batch_size=3,
        progress=False,
    )
    assert len(result["scores"]) == 2 * 4 and 0.0 <= result["baseline_accuracy"] <= 1.0
    assert json.loads(out.read_text()) == result
    expected = {str(s["layer"]): [] for s in result["scores"] if s["gain"] > 0}
    for s in result["scores"]:
        if s["gain"] > 0:
            expected[str(s["layer"])].append(s["head"])
    assert result["heads"] == expected
    if result["heads"]:  # the file plugs straight into the method spec
        from lvlm_steer import parse_spec

        method = parse_spec(f"act:heads=@{out}")
        assert {str(k): list(v) for k, v in method.heads.items()} == result["heads"]
