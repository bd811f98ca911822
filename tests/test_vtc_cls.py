"""VTC-CLS against references from materialised (eager) vision attention: the kept tokens are the top-k by the
paper's score, the LLM gets exactly those features, k = all is the unwrapped model, batches equal single rows,
cached generation equals uncached re-forwards, and bad settings leave the model unwrapped."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import _model, batch, logits, our_hooks, require_reference

import lvlm_steer as ls
from lvlm_steer.hooks import vtc_cls
from lvlm_steer.hooks.vtc_cls import received_scores

TOL = dict(atol=1e-5, rtol=1e-5)
ALL = ["llava", "idefics3", "gemma3", "paligemma", "internvl"]  # families with a vision_scoring (smolvlm: idefics3)
TOKENS = {"llava": 16, "idefics3": 4, "gemma3": 4, "paligemma": 16, "internvl": 4}  # image tokens per image or crop


@contextlib.contextmanager
def eager_vision(model):
    """Materialised vision attention for the reference (the method itself never needs it)."""
    before = model.config.vision_config._attn_implementation
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        yield
    finally:
        model.set_attn_implementation({"vision_config": before})


@contextlib.contextmanager
def feature_layer(model, value: int):
    before = model.config.vision_feature_layer
    model.config.vision_feature_layer = value
    try:
        yield
    finally:
        model.config.vision_feature_layer = before


def reference_cls_scores(model, pixel_values, start: int, last: int) -> torch.Tensor:
    """Paper's score: head-mean attention of the CLS row to the patches, summed over layers start..last."""
    with eager_vision(model), torch.no_grad():
        attn = model.model.vision_tower(pixel_values=pixel_values, output_attentions=True).attentions
    return sum(attn[layer][:, :, 0, 1:].mean(dim=1) for layer in range(start, last + 1))


def reference_received_scores(model, arch: str, inputs, start: int) -> torch.Tensor:
    """SigLIP (no CLS): mean attention each patch receives, head-mean, summed over layers start..last, then
    grouped like the connector groups patches into tokens (Idefics3: 2x2 pixel shuffle, sum; Gemma 3: 2x2
    average pool; PaliGemma: one token per patch)."""
    pv = inputs["pixel_values"]
    if arch in ("idefics3", "smolvlm"):
        pv = pv.flatten(0, 1)
        pv = pv[(pv != 0).flatten(1).any(dim=1)]  # the model drops all-zero padding images
        tower = model.model.vision_model
    else:
        tower = model.model.vision_tower
    with eager_vision(model), torch.no_grad():
        attn = tower(pixel_values=pv, output_attentions=True).attentions
    patches = sum(attn[layer].mean(dim=(1, 2)) for layer in range(start, len(attn)))  # (units, 16)
    if arch == "paligemma":
        return patches
    grid = patches.view(-1, 2, 2, 2, 2)  # (unit, block row, row in block, block col, col in block): 4x4 patches
    tokens = grid.sum(dim=(2, 4)).flatten(1)
    return tokens / 4 if arch == "gemma3" else tokens


def test_kept_tokens_are_topk_of_reference_cls_score_and_llm_gets_them():
    model, processor = _model("llava")
    inputs = batch(processor, rows=(0,))
    base = logits(model, inputs)
    method = ls.VTCCLS(keep=6, start_layer=0)
    with ls.steer(model, method):
        steered = logits(model, inputs)
    ref = reference_cls_scores(model, inputs["pixel_values"], 0, 1)  # tiny Llava: features = last layer (1)
    torch.testing.assert_close(method.selection.scores, ref, **TOL)
    expected = ref.topk(6, dim=1).indices.sort(dim=1).values
    assert torch.equal(method.selection.kept, expected)

    # the LLM must see exactly: the prompt with the other image tokens removed, and those features
    ids = inputs["input_ids"][0]
    image = ids == model.config.image_token_id
    drop = image.nonzero().flatten()[[i for i in range(int(image.sum())) if i not in expected[0].tolist()]]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[drop] = False
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0][expected[0]]
        ref_ids = ids[keep][None]
        embeds = model.get_input_embeddings()(ref_ids)
        embeds[ref_ids == model.config.image_token_id] = features
        ref_logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ref_ids)).logits
    torch.testing.assert_close(steered, ref_logits, **TOL)
    assert (steered[:, -1] - base[:, -1]).abs().max() > 1e-3, "pruning must change the output"


def test_penultimate_feature_layer_scores_only_layers_up_to_it():
    model, processor = _model("llava")
    inputs = batch(processor)
    with feature_layer(model, -2):  # LLaVA-1.5's setting: the LLM sees the output of layer 0 of 2
        method = ls.VTCCLS(keep=4, start_layer=0)
        with ls.steer(model, method):
            logits(model, inputs)
        ref = reference_cls_scores(model, inputs["pixel_values"], 0, 0)
        torch.testing.assert_close(method.selection.scores, ref, **TOL)
        hooks = our_hooks(model)
        with pytest.raises(ls.MethodConfigError, match=r"0\.\.0"):
            ls.steer(model, ls.VTCCLS(keep=4, start_layer=1))
        assert our_hooks(model) == hooks


@contextlib.contextmanager
def qk_norms(model):
    """Give the tiny InternViT random q/k RMSNorms (larger InternVL models have them), restored afterwards."""
    attention = [layer.attention for layer in model.model.vision_tower.encoder.layer]
    saved = [(a.q_norm, a.k_norm) for a in attention]
    torch.manual_seed(0)
    for a in attention:
        a.q_norm, a.k_norm = torch.nn.RMSNorm(a.embed_dim), torch.nn.RMSNorm(a.embed_dim)
        torch.nn.init.uniform_(a.q_norm.weight, 0.5, 2.0)
        torch.nn.init.uniform_(a.k_norm.weight, 0.5, 2.0)
    try:
        yield
    finally:
        for a, (q, k) in zip(attention, saved, strict=True):
            a.q_norm, a.k_norm = q, k


def test_internvl_cls_score_with_qk_norm_through_pixel_shuffle():
    """InternViT has a CLS token and q/k norms over the whole projection; its pixel shuffle folds 2x2 patches."""
    model, processor = _model("internvl")
    inputs = batch(processor)
    method = ls.VTCCLS(keep=2, start_layer=0)
    with qk_norms(model):
        with ls.steer(model, method):
            logits(model, inputs)
        patches = reference_cls_scores(model, inputs["pixel_values"], 0, 1)  # (crops, 16): 4x4 patches
    ref = patches.view(-1, 2, 2, 2, 2).sum(dim=(2, 4)).flatten(1)  # 2x2 blocks in raster order
    torch.testing.assert_close(method.selection.scores, ref, **TOL)
    assert torch.equal(method.selection.kept, ref.topk(2, dim=1).indices.sort(dim=1).values)


@pytest.mark.parametrize("arch", ["idefics3", "smolvlm", "gemma3", "paligemma"])
def test_tower_without_cls_uses_mean_received_attention_through_the_connector(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    method = ls.VTCCLS(keep=2, start_layer=0)
    with ls.steer(model, method):
        logits(model, inputs)
    ref = reference_received_scores(model, arch, inputs, 0)
    torch.testing.assert_close(method.selection.scores, ref, **TOL)
    assert torch.equal(method.selection.kept, ref.topk(2, dim=1).indices.sort(dim=1).values)


def test_received_scores_ignore_padded_patches(monkeypatch):
    torch.manual_seed(0)
    attn = torch.nn.Module()
    attn.num_heads, attn.head_dim, attn.scale = 2, 4, 0.5
    attn.q_proj, attn.k_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    hidden = torch.randn(2, 6, 8)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = valid[:, None, None, :].expand(2, 1, 6, 6)
    q = attn.q_proj(hidden).view(2, 6, 2, 4).transpose(1, 2)
    k = attn.k_proj(hidden).view(2, 6, 2, 4).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf")).softmax(-1)  # (2, H, 6, 6)
    ref = torch.stack([probs[b][:, valid[b]].mean(dim=(0, 1)) for b in range(2)])
    torch.testing.assert_close(received_scores(attn, hidden, mask), ref, **TOL)
    assert received_scores(attn, hidden, mask)[1, 4:].abs().max() == 0
    monkeypatch.setattr(vtc_cls, "PROBE_ELEMENTS", 8)  # one query row per block: same result
    torch.testing.assert_close(received_scores(attn, hidden, mask), ref, **TOL)


@pytest.mark.parametrize("arch", ALL)
def test_keep_all_is_the_unwrapped_model(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    base = logits(model, inputs)
    with ls.steer(model, ls.VTCCLS(keep=1.0, start_layer=0)) as steered:
        assert torch.equal(logits(model, inputs), base)
        assert steered.stats().reduction == 0
    with ls.steer(model, ls.VTCCLS(keep=TOKENS[arch], start_layer=1)):
        assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize("arch", ALL)
def test_left_padded_batch_equals_single_rows(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left-padded"
    method = ls.VTCCLS(keep=0.5, start_layer=0)
    with ls.steer(model, method) as steered:
        both = logits(model, inputs)
        pruned = list(method.selection.pruned)
        stats = steered.stats()
        for row in (0, 1):
            single = logits(model, batch(processor, rows=(row,)))
            assert single.shape[1] == pruned[row]
            torch.testing.assert_close(both[row, -pruned[row] :], single[0], **TOL)
    assert stats.per_layer[0] == pruned and stats.unpruned == inputs["attention_mask"].sum(1).tolist()
    assert 0 < stats.reduction < 1


@pytest.mark.parametrize("arch", ALL)
def test_cached_generate_matches_uncached_reforward(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    steps = 4
    with ls.steer(model, ls.VTCCLS(keep=0.5, start_layer=0)) as steered:
        with torch.no_grad():
            out = steered.generate(
                **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                suppress_tokens=[model.config.image_token_id], output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        prompt = inputs["input_ids"].shape[1]
        assert torch.equal(out.sequences[:, :prompt], inputs["input_ids"]), "sequences start with the prompt"
        reduced = steered.methods[0].prune_inputs(steered, inputs)
        n = reduced["input_ids"].shape[1]
        full = torch.cat([reduced["input_ids"], out.sequences[:, prompt:]], dim=1)
        again = logits(model, steered.adapter.extend_inputs(reduced, full))
    torch.testing.assert_close(torch.stack(out.logits, dim=1), again[:, n - 1 : n - 1 + steps], atol=1e-4, rtol=1e-5)
    greedy = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    with torch.no_grad():
        plain = model.generate(**inputs, **greedy)
        with ls.steer(model, ls.VTCCLS(keep=1.0, start_layer=0)) as steered:
            assert torch.equal(steered.generate(**inputs, **greedy), plain)


def test_spec_round_trip_and_parameters():
    assert ls.parse_spec("vtc_cls:keep=64").keep == 64
    frac = ls.parse_spec("vtc_cls:keep=0.25,start_layer=0")
    assert frac.keep == 0.25 and frac.start_layer == 0 and type(frac.keep) is float
    assert ls.parse_spec(frac.spec()) == frac
    assert ls.VTCCLS.from_dict(frac.to_dict()) == frac
    assert [p[0] for p in ls.VTCCLS.parameters()] == ["keep", "start_layer"]


@pytest.mark.parametrize("kwargs", [{"keep": 0}, {"keep": 1.5}, {"keep": -3}, {"start_layer": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ls.MethodConfigError, match="vtc_cls"):
        ls.VTCCLS(**kwargs)


@pytest.mark.parametrize(
    ("arch", "method", "pattern"),
    [
        ("llava", ls.VTCCLS(keep=17, start_layer=0), r"keep <= 16"),
        ("llava", ls.VTCCLS(keep=4, start_layer=2), r"layers 0\.\.1"),
        ("idefics3", ls.VTCCLS(keep=8, start_layer=0), r"keep <= 4"),
        ("qwen2_vl", ls.VTCCLS(keep=2, start_layer=0), r"Qwen2-VL.*supported: llava.*idefics3.*use fastv"),
        ("llava_next", ls.VTCCLS(keep=2, start_layer=0), r"LLaVA-NeXT.*supported: llava"),
        ("mistral3", ls.VTCCLS(keep=2, start_layer=0), r"supported: llava"),
    ],
)
def test_bad_model_settings_leave_model_unwrapped(arch, method, pattern):
    model, processor = _model(arch)
    inputs = batch(processor)
    base = logits(model, inputs)  # first: transformers installs its own output-capture hooks lazily
    hooks = our_hooks(model)
    with pytest.raises(ls.MethodConfigError, match=pattern):
        ls.steer(model, method)
    assert our_hooks(model) == hooks
    assert torch.equal(logits(model, inputs), base)


def test_plain_model_generate_is_refused_with_the_fix():
    model, processor = _model("llava")
    inputs = batch(processor)
    hooks = our_hooks(model)
    steered = ls.steer(model, ls.VTCCLS(keep=4, start_layer=0))
    with pytest.raises(ls.SteeringError, match=r"steered\.generate\(\*\*inputs"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    assert not steered.active and our_hooks(model) == hooks


def test_inputs_embeds_and_missing_images_are_refused():
    model, processor = _model("llava")
    inputs = batch(processor)
    with ls.steer(model, ls.VTCCLS(keep=4, start_layer=0)) as steered:
        text = steered.adapter.text_only(inputs)
        with pytest.raises(ls.MissingImagesError):
            steered.methods[0].prune_inputs(steered, text)
        with pytest.raises(ls.SteeringError, match="input_ids"):
            steered.methods[0].prune_inputs(steered, {"inputs_embeds": torch.zeros(1, 3, 64)})


@pytest.mark.slow
def test_real_smolvlm_layout_17_tiles():
    """The benchmark model's real processor: 17 crops x 64 tokens; 25% kept per crop, k = all is the model."""
    require_reference("smolvlm-256m-instruct")
    from lvlm_steer.bench.model import benchmark_inputs, benchmark_model

    model, processor, _ = benchmark_model("small")
    processor.image_processor.do_image_splitting = True
    inputs = benchmark_inputs(processor)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 17 * 64
    base = logits(model, inputs)
    method = ls.VTCCLS(keep=0.25, start_layer=0)
    with ls.steer(model, method, processor=processor) as steered:
        pruned = logits(model, inputs)
        assert method.selection.kept.shape == (17, 16)
        assert pruned.shape[1] == inputs["input_ids"].shape[1] - 17 * 48
        assert steered.stats().reduction > 0.5
    with ls.steer(model, ls.VTCCLS(keep=1.0, start_layer=0), processor=processor):
        assert torch.equal(logits(model, inputs), base)


def test_removal_leaves_no_trace_and_composes_with_a_text_side_method():
    model, processor = _model("llava")
    inputs = batch(processor)
    base = logits(model, inputs)
    hooks = our_hooks(model)
    ablate = ls.AblateHeads({0: [1], 2: [0]})
    with ls.steer(model, ls.VTCCLS(keep=0.25, start_layer=0), ablate) as steered:
        both = logits(model, inputs)
        with torch.no_grad():
            steered.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert our_hooks(model) == hooks and torch.equal(logits(model, inputs), base)
    alone = ls.VTCCLS(keep=0.25, start_layer=0)
    with ls.steer(model, alone) as steered:
        reduced = alone.prune_inputs(steered, inputs)
    with ls.steer(model, ablate):
        torch.testing.assert_close(both, logits(model, reduced), **TOL)
