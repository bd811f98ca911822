"""The pre-LLM reduction base with merged tokens: a test-only reducer that averages pairs of image tokens must give
exactly the LLM run on those merged features (reference built by hand from the model's own image features), batched
with left padding equal to single rows, and cached generation equal to uncached re-forwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import _model, batch, logits

import lvlm_steer as ls
from lvlm_steer import vision_attention
from lvlm_steer.vision_pruning import Reduction, TowerTokens, VisionReducer

TOL = dict(atol=1e-5, rtol=1e-5)
ARCHS = ["llava", "idefics3", "gemma3", "internvl"]  # one image per row / crops per image / markers / pixel shuffle


@dataclass
class PairMean(VisionReducer):
    """Test-only: each unit's tokens averaged in consecutive pairs (T tokens -> T / 2 merged tokens)."""

    name: ClassVar[str] = "pair_mean"

    def reduce(self, tokens: TowerTokens) -> Reduction:
        assert tokens.attention is None  # asked for none
        f = tokens.features
        return Reduction(merged=list(f.view(f.shape[0], -1, 2, f.shape[-1]).mean(dim=2)))


def merged_reference(model, adapter, inputs) -> torch.Tensor:
    """One row: the prompt with each unit's image tokens cut to its first T / 2 slots, those slots filled with the
    pairwise means of the unit's features, through inputs_embeds."""
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        features = torch.cat(list(adapter.encode_images(inputs).pooler_output))
    per_unit = adapter.vision_scoring().tokens_per_unit
    merged = features.view(-1, per_unit // 2, 2, features.shape[-1]).mean(dim=2).flatten(0, 1)
    slots = (ids == adapter.image_token_id).nonzero().flatten().view(-1, per_unit)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[slots[:, per_unit // 2 :].flatten()] = False
    ref_ids = ids[keep][None]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ref_ids)
        embeds[ref_ids == adapter.image_token_id] = merged
        extra = {k: v[0][keep][None] for k, v in inputs.items() if k in adapter.token_inputs}
        return model(inputs_embeds=embeds, attention_mask=torch.ones_like(ref_ids), **extra).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_tokens_reach_the_llm_and_batches_equal_single_rows(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    adapter = ls.adapter_for(model, processor)
    refs = [merged_reference(model, adapter, batch(processor, rows=(row,))) for row in (0, 1)]
    method = PairMean()
    with ls.steer(model, method) as steered:
        both = logits(model, inputs)
        pruned = list(method.selection.pruned)
        assert method.selection.kept is None
        assert 0 < steered.stats().reduction < 1
        for row in (0, 1):
            got = logits(model, batch(processor, rows=(row,)))
            torch.testing.assert_close(got, refs[row], **TOL)
            torch.testing.assert_close(both[row, -pruned[row] :], got[0], **TOL)


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_merged_tokens_cached_generate_matches_uncached_reforward(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    steps = 4
    with ls.steer(model, PairMean()) as steered:
        with torch.no_grad():
            out = steered.generate(
                **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                suppress_tokens=[model.config.image_token_id], output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        prompt = inputs["input_ids"].shape[1]
        assert torch.equal(out.sequences[:, :prompt], inputs["input_ids"]), "sequences start with the prompt"
        reduced = steered.methods[0].reduce_inputs(steered, inputs)
        n = reduced["input_ids"].shape[1]
        full = torch.cat([reduced["input_ids"], out.sequences[:, prompt:]], dim=1)
        again = logits(model, steered.adapter.extend_inputs(reduced, full))
    torch.testing.assert_close(torch.stack(out.logits, dim=1), again[:, n - 1 : n - 1 + steps], atol=1e-4, rtol=1e-5)


def test_reductions_are_checked():
    with pytest.raises(ValueError, match="either kept"):
        Reduction()
    with pytest.raises(ValueError, match="either kept"):
        Reduction(kept=torch.zeros(1, 1, dtype=torch.long), merged=[torch.zeros(1, 2)])

    @dataclass
    class Empty(VisionReducer):
        name: ClassVar[str] = "empty"

        def reduce(self, tokens: TowerTokens) -> Reduction:
            return Reduction(merged=[t[:0] for t in tokens.features])

    model, processor = _model("llava")
    with ls.steer(model, Empty()):
        with pytest.raises(ls.SteeringError, match="1..16 merged tokens"):
            logits(model, batch(processor))
    with pytest.raises(ls.MethodConfigError, match="supported: llava.*use fastv"):
        ls.steer(_model("qwen2_vl")[0], PairMean())


def test_received_scores_in_blocks_equal_one_block(monkeypatch):
    torch.manual_seed(0)
    attn = torch.nn.Module()
    attn.num_heads, attn.head_dim, attn.scale = 2, 4, 0.5
    attn.q_proj, attn.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    hidden = torch.randn(2, 6, 8)
    whole = vision_attention.received_scores(attn, hidden, None)
    monkeypatch.setattr(vision_attention, "PROBE_ELEMENTS", 8)  # one query row per block
    torch.testing.assert_close(vision_attention.received_scores(attn, hidden, None), whole, **TOL)
