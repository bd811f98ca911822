"""Prefill stats: FastV's FLOPs formula (checked against the paper's Table 1) and Steering.stats()."""

from __future__ import annotations

import pytest
import torch
from conftest import _model, batch

import lvlm_steer as ls
from lvlm_steer.method import Method
from lvlm_steer.stats import LayerTokens, PrefillStats, combine, prefill_flops


def test_flops_formula_matches_fastv_table1():
    # LLaVA-1.5-13B: d=5120, m=13824, 40 layers, 36 system tokens + 576 image tokens
    d, m, layers = 5120, 13824, 40
    assert prefill_flops(612, d, m) / 1e9 == pytest.approx(154.6, abs=0.05)
    # K=2, R=50%: layers 0..1 see 612 tokens, layers 2..39 see 36 + 288
    tokens = LayerTokens([612], [[612]] * 2 + [[36 + 288]] * (layers - 2))
    stats = PrefillStats.from_layer_tokens(tokens, d, m)
    assert stats.mean_layer_flops / 1e9 == pytest.approx(84.6, abs=0.05)
    assert stats.total_flops_unpruned / layers / 1e9 == pytest.approx(154.6, abs=0.05)
    assert stats.reduction == pytest.approx(1 - 84.6 / 154.6, abs=1e-3)
    # 7B: d=4096, m=11008 gives the paper's 99.3B
    assert prefill_flops(612, 4096, 11008) / 1e9 == pytest.approx(99.3, abs=0.05)


def test_rows_are_costed_separately_and_reported():
    stats = PrefillStats.from_layer_tokens(LayerTokens([10, 6], [[10, 6], [5, 3]]), 8, 16)
    assert stats.flops_per_layer[0] == prefill_flops(10, 8, 16) + prefill_flops(6, 8, 16)
    assert stats.flops_per_layer[1] == prefill_flops(5, 8, 16) + prefill_flops(3, 8, 16)
    assert stats.flops_per_layer_unpruned == [stats.flops_per_layer[0]] * 2
    assert stats.tokens_per_layer == [16, 8]
    data = stats.to_dict()
    assert data["tokens_per_layer"] == [[10, 6], [5, 3]] and data["reduction"] == stats.reduction
    text = str(stats)
    assert "reduction" in text and "10,6" in text and len(text.splitlines()) == 4


def test_combine_takes_max_unpruned_and_min_per_layer():
    a = LayerTokens([10, 8], [[10, 8], [6, 8]])
    b = LayerTokens([9, 8], [[9, 8], [7, 4]])
    out = combine([a, b])
    assert out.unpruned == [10, 8] and out.per_layer == [[9, 8], [6, 4]]


def test_stats_without_pruning_counts_valid_prompt_tokens():
    model, processor = _model("llava")
    inputs = batch(processor)
    with ls.steer(model) as steering:
        with pytest.raises(RuntimeError, match="prefill first"):
            steering.stats()
        with torch.no_grad():
            model(**inputs)
        stats = steering.stats()
    valid = inputs["attention_mask"].sum(1).tolist()
    info = steering.info
    assert stats.unpruned == valid
    assert stats.per_layer == [valid] * info.num_layers
    assert stats.reduction == 0.0
    assert stats.flops_per_layer[0] == sum(prefill_flops(n, info.hidden_size, info.intermediate_size) for n in valid)


class _Reports(Method):
    name = "_reports_for_stats_test"

    def layer_tokens(self, steering):
        n = steering.info.num_layers
        return LayerTokens([99, 99], [[99, 5]] * n)


def test_stats_use_method_reports():
    model, processor = _model("llava")
    inputs = batch(processor)
    with ls.steer(model, _Reports()) as steering:
        with torch.no_grad():
            model(**inputs)
        stats = steering.stats()
    assert stats.unpruned == [99, 99] and stats.per_layer[0] == [99, 5]
    assert stats.reduction > 0


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_stats_with_and_without_fastv(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    valid = inputs["attention_mask"].bool()
    image = ((inputs["input_ids"] == model.config.image_token_id) & valid).sum(1)
    n_valid = valid.sum(1)
    with ls.steer(model) as steering:
        with torch.no_grad():
            model(**inputs)
        plain = steering.stats()
    with ls.steer(model, ls.FastV(k=2, r=0.5)) as steering:
        with torch.no_grad():
            model(**inputs)
        pruned = steering.stats()
    with ls.steer(model, ls.FastV(k=2, r=0.0)) as steering:
        with torch.no_grad():
            model(**inputs)
        neutral = steering.stats()
    kept = (n_valid - image + torch.floor(image * 0.5 + 0.5).long()).tolist()
    layers = plain.num_layers
    assert plain.per_layer == [n_valid.tolist()] * layers
    assert pruned.unpruned == n_valid.tolist()
    assert pruned.per_layer == [n_valid.tolist()] * 2 + [kept] * (layers - 2)
    assert pruned.total_flops_unpruned == plain.total_flops
    assert 0 < pruned.reduction < 1 and neutral.to_dict() == plain.to_dict()
