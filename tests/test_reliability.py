"""Evals under bad inputs, faults and concurrency: each case here once lost results silently, hung, or ended in a
traceback; now it is kept apart, refused with a message naming the file or setting, or skipped and counted."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _model

import lvlm_steer.evals.runner as runner_module
from lvlm_steer.cli import main
from lvlm_steer.evals.chair_eval import evaluate_chair
from lvlm_steer.evals.io import read_jsonl, write_json_atomic
from lvlm_steer.evals.pope import PopeDataError, build_pope, load_questions
from lvlm_steer.evals.pope_eval import evaluate_pope
from lvlm_steer.evals.runner import parse_conditions
from lvlm_steer.testing.coco import make_coco

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(batch_size=4, max_new_tokens=2, progress=False)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    data = make_coco(root, n_images=6, seed=0)
    build_pope(data["instances"], n_images=4, seed=0, out_dir=root / "pope")
    return data, root / "pope" / "coco_pope_random.json"


def _pope(coco, out, files=None, model=None, **kwargs):
    data, questions = coco
    model, processor = model or _model("llava")
    args = {**FAST, "limit": 6, **kwargs}
    conditions = parse_conditions(["none"])
    return evaluate_pope(
        model, processor, "tiny:llava", files or [questions], data["images_dir"], conditions, out, **args
    )


def _cli(coco, out, *extra):
    data, questions = coco
    return [
        "eval", "pope", "--model", "tiny:llava", "--images", str(data["images_dir"]), "--questions", str(questions),
        "--batch-size", "4", "--max-new-tokens", "2", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


# --- question files -----------------------------------------------------------------------------------------------


def test_two_files_with_the_same_split_keep_their_own_records(coco, tmp_path):
    _, questions = coco
    lines = questions.read_text().splitlines(keepends=True)
    a, b = tmp_path / "a" / "coco_pope_random.json", tmp_path / "b" / "coco_pope_random.json"
    for path, part in ((a, lines[:12]), (b, lines[12:])):
        path.parent.mkdir()
        path.write_text("".join(part))
    summary = _pope(coco, tmp_path / "out", files=[a, b])
    assert len(list(read_jsonl(tmp_path / "out" / "results.jsonl"))) == 12  # 6 per file, none dropped
    assert [d["split"] for d in summary["data"]] == ["a/coco_pope_random", "b/coco_pope_random"]
    metrics = summary["metrics"]["none"]
    assert metrics["a/coco_pope_random"]["n"] == metrics["b/coco_pope_random"]["n"] == 6
    assert metrics["overall"]["n"] == 12


def test_the_same_question_file_twice_is_refused(coco, tmp_path):
    _, questions = coco
    with pytest.raises(ValueError, match="coco_pope_random.json is given twice"):
        _pope(coco, tmp_path / "out", files=[questions, questions])
    copy_path = tmp_path / "copy.json"
    copy_path.write_bytes(questions.read_bytes())
    with pytest.raises(ValueError, match="has the same content as"):
        _pope(coco, tmp_path / "out", files=[questions, copy_path])


@pytest.mark.parametrize("text", [None, "", "   ", 3])
def test_question_without_text_is_refused_with_its_line(tmp_path, text):
    path = tmp_path / "q.json"
    good = {"question_id": 1, "image": "x.jpg", "text": "Is there a cat in the image?", "label": "yes"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "question_id": 2, "text": text}) + "\n")
    with pytest.raises(PopeDataError, match=r"q\.json, line 2: text is .*non-empty text"):
        load_questions(path)
    path.write_text(json.dumps({**good, "image": None}) + "\n")
    with pytest.raises(PopeDataError, match="line 1: image is None"):
        load_questions(path)


def test_limit_below_one_is_refused(coco, tmp_path, capsys):
    for value in ("0", "-5"):
        with pytest.raises(SystemExit) as exit_info:
            main(_cli(coco, tmp_path / "out", "--limit", value))
        assert exit_info.value.code == 2
        assert "--limit: must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="limit must be >= 1"):
        _pope(coco, tmp_path / "api", limit=0)


# --- images -------------------------------------------------------------------------------------------------------


@pytest.fixture
def broken_images(coco, tmp_path):
    """A copy of the images where the first three the questions name are empty, truncated and a bomb."""
    from PIL import Image

    data, questions = coco
    images = tmp_path / "images"
    images.mkdir()
    for f in data["images_dir"].iterdir():
        (images / f.name).write_bytes(f.read_bytes())
    names = list(dict.fromkeys(q.image for q in load_questions(questions)))
    (images / names[0]).write_bytes(b"")
    raw = (images / names[1]).read_bytes()
    (images / names[1]).write_bytes(raw[: len(raw) // 2])
    Image.new("RGB", (200, 200)).save(images / names[2], format="JPEG")  # a bomb once the pixel limit is lowered
    return images, names


def test_unreadable_images_stop_with_the_file_or_are_skipped_and_counted(coco, broken_images, tmp_path, capsys):
    from PIL import Image

    images, names = broken_images
    data, questions = coco

    def argv(out: str, *extra: str) -> list[str]:
        args = _cli(coco, tmp_path / out, *extra)
        args[args.index("--images") + 1] = str(images)
        return args

    assert main(argv("empty")) == 2  # the empty file is found before the model loads
    assert f"{names[0]} cannot be read" in capsys.readouterr().err
    empty = (images / names[0]).read_bytes()
    (images / names[0]).write_bytes((images / names[3]).read_bytes())
    assert main(argv("truncated")) == 2  # the truncated file decodes only during the run
    err = capsys.readouterr().err
    assert f"{names[1]} cannot be read" in err and "truncated" in err and "--skip-missing" in err
    (images / names[0]).write_bytes(empty)
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 10_000  # the test images have 96 x 72 = 6912 pixels; the 200 x 200 one is a bomb
    try:
        assert main(argv("bomb", "--skip-missing")) == 0
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    summary = json.loads((tmp_path / "bomb" / "summary.json").read_text())
    assert summary["counts"]["skipped_unreadable_images"] == 3
    kept = [q for q in load_questions(questions) if q.image not in names[:3]]
    assert summary["counts"]["records"] == len(kept) == 6


# --- answers ------------------------------------------------------------------------------------------------------


def test_empty_answers_are_counted_in_every_summary(coco, tmp_path, monkeypatch):
    data, _ = coco
    real = runner_module.Runner._generate
    monkeypatch.setattr(
        runner_module.Runner, "_generate", lambda self, s, inputs: ["", "No", "", "yes"][: len(inputs["questions"])]
    )
    summary = _pope(coco, tmp_path / "pope", limit=8)
    assert summary["metrics"]["none"]["overall"]["empty_answers"] == 4
    assert summary["metrics"]["none"]["random"]["empty_answers"] == 4
    model, processor = _model("llava")
    chair = evaluate_chair(
        model, processor, "tiny:llava", Path(data["instances"]).parent, data["images_dir"], parse_conditions(["none"]),
        tmp_path / "chair", n_images=4, **FAST,
    )  # fmt: skip
    assert chair["metrics"]["none"]["empty_answers"] == 2
    monkeypatch.setattr(runner_module.Runner, "_generate", real)


# --- model and output paths ---------------------------------------------------------------------------------------


def test_mistyped_model_path_says_it_does_not_exist(capsys):
    argv = ["generate", "--model", "/mistyped/local/path", "--image", "random", "--prompt", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model path /mistyped/local/path does not exist" in err and "Repo id" not in err


def test_broken_model_folder_is_one_line_naming_it(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{oops")
    assert main(["generate", "--model", str(folder), "--image", "random", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(folder) in err, err


def test_out_that_is_a_file_fails_before_the_model_loads(coco, tmp_path, capsys, monkeypatch):
    import lvlm_steer.cli.evals as cli_evals

    monkeypatch.setattr(cli_evals, "load", lambda args: pytest.fail("the model was loaded before --out was checked"))
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert main(_cli(coco, out)) == 2
    assert f"--out {out} is a file" in capsys.readouterr().err
    data, questions = coco
    argv = _cli(coco, tmp_path / "ok")
    argv[argv.index("--images") + 1] = str(tmp_path / "no-images")
    assert main(argv) == 2
    assert "is missing; check --images" in capsys.readouterr().err


def test_os_errors_at_the_cli_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import lvlm_steer.cli.generate as cli_generate

    def full_disk(args):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "results.jsonl"))

    monkeypatch.setattr(cli_generate, "cmd_generate", full_disk)
    assert main(["generate", "--image", "random", "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'out' / 'results.jsonl'}: No space left on device\n"


# --- the output folder --------------------------------------------------------------------------------------------


def test_a_second_eval_on_a_busy_folder_is_refused_naming_the_holder(coco, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom lvlm_steer.evals.out_dir import "
         "locked_out_dir\nwith locked_out_dir(Path(sys.argv[1])):\n    print('locked', flush=True)\n    time.sleep(60)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_cli(coco, out)) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another eval (PID {holder.pid} on" in err
    finally:
        holder.kill()
        holder.wait()
    (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": "x", "started": 0}))  # left by a dead process
    assert main(_cli(coco, out, "--limit", "4")) == 0


def test_resume_keeps_the_results_file_and_cleans_leftovers(coco, tmp_path):
    out = tmp_path / "out"
    _pope(coco, out)
    results = out / "results.jsonl"
    inode, before = results.stat().st_ino, results.read_text()
    (out / "summary.json.1234abcd.tmp").write_text("{half")
    (out / "rank1.done").write_text("done\n")
    _pope(coco, out)  # nothing left to generate
    assert results.stat().st_ino == inode and results.read_text() == before  # not replaced under a writer
    assert not list(out.glob("*.tmp")) and not list(out.glob("rank*.done"))


def test_result_files_honour_the_umask(coco, tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "x.json", {"a": 1})
        _pope(coco, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    for name in ("summary.json", "run.json", "results.jsonl"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


def test_report_on_a_torn_summary_names_the_file(coco, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"task": "pope", "metr')
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 2
    assert f"{out / 'summary.json'} is not valid JSON" in capsys.readouterr().err


# --- resume settings ----------------------------------------------------------------------------------------------


def test_resume_with_other_generation_settings_is_refused(coco, tmp_path):
    out = tmp_path / "out"
    _pope(coco, out, limit=3)
    with pytest.raises(ValueError, match=r"max_new_tokens \(this run 3, the folder's 2; flag --max-new-tokens\)"):
        _pope(coco, out, limit=3, max_new_tokens=3)
    model, processor = _model("llava")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"dtype \(this run 'bfloat16', the folder's 'float32'; flag --dtype\)"):
        _pope(coco, out, limit=3, model=(bf16, processor))
    run = json.loads((out / "run.json").read_text())
    assert run["device"] == "cpu" and run["attn_implementation"] == "sdpa"
    data, _ = coco
    chair_args = (
        processor,
        "tiny:llava",
        Path(data["instances"]).parent,
        data["images_dir"],
        parse_conditions(["none"]),
    )
    evaluate_chair(model, *chair_args, tmp_path / "chair", n_images=2, **FAST)
    with pytest.raises(ValueError, match=r"dtype \(this run 'bfloat16'"):
        evaluate_chair(bf16, *chair_args, tmp_path / "chair", n_images=2, **FAST)


# --- several processes --------------------------------------------------------------------------------------------


def test_world_size_without_a_launcher_fails_fast(coco, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *_cli(coco, tmp_path / "out")],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WORLD_SIZE=2, RANK=0 is set but MASTER_ADDR, MASTER_PORT is not" in proc.stderr
    assert "unset WORLD_SIZE and RANK" in proc.stderr and time.monotonic() - start < 120


def test_missing_peer_is_found_within_the_join_timeout(monkeypatch):
    import socket

    import lvlm_steer.evals.shards as shards

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(shards, "_joined", {})
    start = time.monotonic()
    with pytest.raises(shards.ShardSetupError, match=r"WORLD_SIZE=2, RANK=0: not all 2 processes met at 127\.0\.0\.1"):
        shards.join_shards(timeout_s=3)
    assert time.monotonic() - start < 30
