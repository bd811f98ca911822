"""The benchmark model: the real SmolVLM-256M layout (needs ../shared/reference; skipped without it)."""

from __future__ import annotations

import pytest
from conftest import require_reference

from lvlm_steer.bench.model import benchmark_inputs, benchmark_model
from lvlm_steer.bench.overhead import spread_heads


def test_full_benchmark_prompt_layout():
    require_reference("smolvlm-256m-instruct")
    from transformers import AutoProcessor

    from lvlm_steer.bench.model import SMOLVLM_DIR, reference_dir

    processor = AutoProcessor.from_pretrained(reference_dir() / SMOLVLM_DIR)
    inputs = benchmark_inputs(processor)
    ids = inputs["input_ids"]
    assert ids.shape == (1, 1139) and int((ids == 49190).sum()) == 1088


@pytest.mark.slow
def test_small_variant_builds_and_runs():
    require_reference("smolvlm-256m-instruct")
    import torch

    model, processor, description = benchmark_model("small")
    assert description["text_layers"] == 4 and "reduced" in description["vision_tower"]
    assert model.config.text_config.num_attention_heads == 9 and model.config.text_config.num_key_value_heads == 3
    inputs = benchmark_inputs(processor)
    assert int((inputs["input_ids"] == 49190).sum()) == 64
    with torch.no_grad():
        out = model(**inputs).logits
    assert out.shape[-1] == 49280 and torch.isfinite(out).all()


def test_spread_heads_picks_distinct_heads():
    for layers, heads in ((30, 9), (4, 9), (2, 4)):
        chosen = spread_heads(layers, heads)
        pairs = [(layer, h) for layer, hs in chosen.items() for h in hs]
        assert len(pairs) == len(set(pairs)) == min(10, layers * heads)
        assert all(0 <= layer < layers and 0 <= h < heads for layer, h in pairs)
