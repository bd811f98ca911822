"""`bench pruning` smoke test at the smallest settings: every condition runs and reports its numbers."""

from __future__ import annotations

import json
import math

from lvlm_steer.bench.pruning import run_pruning_bench


def test_bench_pruning_smoke():
    report = run_pruning_bench(["llava15:tiny"], runs=1, new_tokens=2, progress=lambda msg: None)
    result = report["models"]["llava15:tiny"]
    assert result["image_tokens"] == 16 and result["prompt_tokens"] == 16 + sum((35, 25))
    summary = result["summary"]
    assert set(summary) == {"unwrapped", "fastv_k2_r0.5", "fastv_k2_r0.75", "vtc_cls_keep0.25"}
    assert summary["unwrapped"]["flops_reduction"] == 0
    fastv50, fastv75, vtc = summary["fastv_k2_r0.5"], summary["fastv_k2_r0.75"], summary["vtc_cls_keep0.25"]
    assert 0 < fastv50["flops_reduction"] < fastv75["flops_reduction"] < 1
    assert vtc["last_layer_tokens"] == 60 + 4  # 25% of 16 image tokens, all text tokens
    assert vtc["flops_reduction"] > fastv75["flops_reduction"]  # fewer tokens in every layer, not only after K
    assert fastv50["flops_reduction_real_depth"] > fastv50["flops_reduction"]  # 30 of 32 layers pruned, not 2 of 4
    assert result["real_text_layers"] == 32
    for s in summary.values():
        assert all(math.isfinite(s[k]) and s[k] > 0 for k in ("prefill_s", "ttft_s", "decode_tokens_per_s"))


def test_bench_pruning_cli(tmp_path, capsys):
    from lvlm_steer.cli import main

    out = tmp_path / "pruning.json"
    args = ["bench", "pruning", "--model", "llava15:tiny", "--runs", "1", "--new-tokens", "2", "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["models"]["llava15:tiny"]["summary"]["vtc_cls_keep0.25"]["flops_reduction"] > 0
    assert main(["bench", "pruning", "--model", "llava16"]) == 2
    assert "choose from" in capsys.readouterr().err
