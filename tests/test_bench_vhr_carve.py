"""`lvlm-steer bench vhr-carve` smoke test on the small benchmark variant (needs ../shared/reference)."""

from __future__ import annotations

import json

from conftest import require_reference


def test_bench_vhr_carve_small_writes_json(tmp_path, capsys):
    require_reference("smolvlm-256m-instruct")
    from lvlm_steer.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "vhr-carve", "--variant", "small", "--runs", "1", "--new-tokens", "2", "--capture-steps", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "vhr-carve" and result["runs"] == 1
    conditions = {"baseline", "carve", "carve_second_question"} | ({"vhr"} if result["vhr"] else set())
    assert set(result["seconds_per_sample"]) == conditions
    assert all(len(result["runs_s"][c]) == 1 for c in conditions)  # the warm-up run is not counted
    assert result["vs_baseline"]["baseline"] == 1.0
    assert set(result["carve_parts_s"]) == {
        f"{c}.{p}" for c in ("carve", "carve_second_question") for p in ("refine", "answer")
    }
    assert set(result["meets_targets"]) <= {"vhr", "carve"} and "carve" in result["meets_targets"]
    assert '"benchmark": "vhr-carve"' in capsys.readouterr().out  # also printed
