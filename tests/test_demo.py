"""``lvlm-steer demo --limit 20`` runs end to end on the shipped testbed and writes the report."""

from __future__ import annotations

import json

import pytest

from lvlm_steer.testbed import WEIGHTS_DIR

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model.safetensors").is_file(), reason="testbed weights not built")


@pytest.mark.slow
def test_demo_limit_runs_end_to_end(tmp_path, capsys):
    import lvlm_steer as ls
    from lvlm_steer.cli import main

    assert main(["demo", "--limit", "20", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").stat().st_size > 0
    pope, chair = report["runs"]
    assert pope["task"] == "pope" and chair["task"] == "chair"
    methods = {r["method"] for r in pope["rows"]}
    assert "none" in methods
    for name in ls.method_names():  # every method was evaluated or its skip was explained
        assert any(m.split(":")[0] == name for m in methods) or f"skipping {name}:" in out
    splits = {"random", "popular", "adversarial"}
    assert splits <= {r["split"] for r in pope["rows"]}
    assert all(r["n"] == 20 for r in pope["rows"] if r["split"] in splits)
    none = next(r for r in pope["rows"] if r["method"] == "none" and r["split"] == "random")
    assert none["accuracy"] > 0.7


def test_demo_rejects_bad_method_spec(tmp_path, capsys):
    from lvlm_steer.cli import main

    assert main(["demo", "--limit", "2", "--out", str(tmp_path), "--method", "nosuch", "--no-progress"]) != 0
    assert "unknown method" in capsys.readouterr().err
