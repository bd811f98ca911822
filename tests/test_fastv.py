"""FastV against an explicit reference: the keep set is chosen from eager (materialized) attention probabilities,
and the model's own decoder layers are run one row at a time on the kept tokens with their original rotary
positions. Also: cached decode == uncached re-forward, padded batch == single rows, r=0 == unwrapped."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import _model, batch, greedy_with_logits, logits, our_hooks

import lvlm_steer as ls
from lvlm_steer.adapters import adapter_for
from lvlm_steer.errors import ConflictError, MethodConfigError, MissingImagesError

ARCHS = ["llava", "qwen2_vl"]
TOL = dict(atol=1e-5, rtol=1e-5)


# -- reference -------------------------------------------------------------------------------------------------
def _layers(model):
    return model.model.language_model.layers


def _eager_attentions(model, inputs, layer):
    """(B, H, L, L) eager attention probabilities of text layer ``layer`` (unwrapped model)."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    return out.attentions[layer]


def reference_keep(model, inputs, k, r, score="last"):
    """Per row, the prompt slots FastV keeps (loops over rows and tokens, on purpose: written from the paper)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image = (ids == model.config.image_token_id) & mask
    probs = _eager_attentions(model, inputs, k - 1) if k > 0 else None
    kept = []
    for b in range(ids.shape[0]):
        slots = image[b].nonzero().flatten().tolist()
        n = math.floor(len(slots) * (1 - r) + 0.5)
        if k == 0:
            chosen = [s for j, s in enumerate(slots) if (j + 1) * n // len(slots) > j * n // len(slots)]
        else:
            heads = probs[b].mean(dim=0)  # (L, L)
            if score == "last":
                received = heads[-1]
            else:
                rows = mask[b].nonzero().flatten()
                received = heads[rows].mean(dim=0)
            chosen = sorted(slots, key=lambda s: (-float(received[s]), s))[:n]
        text = [s for s in range(ids.shape[1]) if mask[b, s] and not image[b, s]]
        kept.append(sorted(set(text) | set(chosen) | {ids.shape[1] - 1}))
    return kept


def _layer_inputs(model, inputs):
    """Hidden states and rotary cos/sin entering text layer 0 (unwrapped full forward)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    handle = _layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["h"], seen["pe"]


def reference_logits(model, inputs, k, kept):
    """Per row: layers < k on the row's valid tokens, layers >= k on ``kept[b]`` only, original cos/sin."""
    h0, (cos, sin) = _layer_inputs(model, inputs)
    mask = inputs["attention_mask"].bool()
    text = model.model.language_model
    out = []
    for b in range(h0.shape[0]):
        pos = mask[b].nonzero().flatten()
        slots = pos.tolist()
        h = h0[b, pos][None]
        with torch.no_grad():
            for i, layer in enumerate(_layers(model)):
                if i == k:
                    sel = torch.tensor([slots.index(s) for s in kept[b]])
                    h, pos = h[:, sel], pos[sel]
                n = h.shape[1]
                causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
                pe = (cos[min(b, cos.shape[0] - 1), pos][None], sin[min(b, sin.shape[0] - 1), pos][None])
                h = layer(h, attention_mask=causal, position_embeddings=pe)
                h = h[0] if isinstance(h, tuple) else h
            out.append(model.lm_head(text.norm(h))[0])
    return out


def _fast(model, inputs, method):
    with ls.steer(model, method) as steering:
        fast = logits(model, inputs)
        kept = steering.state_of(method).kept_positions
    return fast, kept


def _check_against_reference(arch, k, r, score="last"):
    model, processor = _model(arch)
    inputs = batch(processor)
    fast, kept_slots = _fast(model, inputs, ls.FastV(k=k, r=r, score=score))
    kept = reference_keep(model, inputs, k, r, score)
    ref = reference_logits(model, inputs, k, kept)
    for b in range(fast.shape[0]):
        slots = kept_slots[b]
        assert slots[slots >= 0].tolist() == kept[b], f"row {b}: keep set differs from the eager reference"
        torch.testing.assert_close(fast[b, slots >= 0], ref[b], **TOL)
    base = logits(model, inputs)
    assert (fast[:, -1] - base[:, -1]).abs().max() > 1e-3, "pruning must change the next-token logits"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [0, 2])
def test_fastv_matches_reference(arch, k):
    _check_against_reference(arch, k, 0.5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fastv_mean_score_matches_reference(arch):
    _check_against_reference(arch, 1, 0.75, score="mean")


# -- decode, batches, neutral ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [0, 2])
def test_cached_decode_equals_uncached_reforward(arch, k):
    model, processor = _model(arch)
    inputs = batch(processor, rows=(1,))
    kept = reference_keep(model, inputs, k, 0.5)
    with ls.steer(model, ls.FastV(k=k, r=0.5)) as steering:
        with torch.no_grad():
            seq, steps = greedy_with_logits(model, inputs, steps=4)
        assert steering.state_of(steering.methods[0]).kept_positions[0].tolist() == kept[0]
        cache_len = _cache_lengths(model, inputs)
    prompt = inputs["input_ids"].shape[1]
    extended = adapter_for(model).extend_inputs(inputs, seq)
    grown = [kept[0] + list(range(prompt, seq.shape[1]))]
    ref = reference_logits(model, extended, k, grown)[0]
    n_gen = seq.shape[1] - prompt
    torch.testing.assert_close(steps[0], ref[-n_gen - 1 : -1], **TOL)
    # layers before k cache the whole prompt, layers from k on only the kept tokens
    assert cache_len[:k] == [prompt] * k and cache_len[k:] == [len(kept[0])] * (len(cache_len) - k)


def _cache_lengths(model, inputs):
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    return [int(cache.get_seq_length(i)) for i in range(len(_layers(model)))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [0, 2])
def test_padded_batch_equals_single_rows(arch, k):
    model, processor = _model(arch)
    both = batch(processor)
    with ls.steer(model, ls.FastV(k=k, r=0.5)):
        with torch.no_grad():
            seq, steps = greedy_with_logits(model, both, steps=3)
            for row in (0, 1):
                one = batch(processor, rows=(row,))
                seq1, steps1 = greedy_with_logits(model, one, steps=3)
                assert torch.equal(seq[row, -3:], seq1[0, -3:])
                torch.testing.assert_close(steps[row], steps1[0], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_r_zero_is_identical(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    base = logits(model, inputs)
    with torch.no_grad():
        base_seq, base_steps = greedy_with_logits(model, inputs)
    with ls.steer(model, ls.FastV(k=2, r=0.0)):
        assert torch.equal(logits(model, inputs), base)
        with torch.no_grad():
            seq, steps = greedy_with_logits(model, inputs)
    assert torch.equal(seq, base_seq) and torch.equal(steps, base_steps)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [0, 2])
def test_keeping_every_token_matches_unwrapped_at_valid_positions(arch, k):
    """r small enough to keep all image tokens: the pruning path runs (padding dropped, masks rebuilt) and
    must reproduce the unwrapped logits at every valid position, in a left-padded batch."""
    model, processor = _model(arch)
    inputs = batch(processor)
    base = logits(model, inputs)
    fast, kept = _fast(model, inputs, ls.FastV(k=k, r=1e-6))
    valid = inputs["attention_mask"].bool()
    for b in range(2):
        slots = kept[b][kept[b] >= 0]
        assert slots.tolist() == valid[b].nonzero().flatten().tolist()
        torch.testing.assert_close(fast[b, kept[b] >= 0], base[b, slots], **TOL)


# -- more architectures (quick invariants) ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llava_next", "idefics3", "internvl", "mistral3", "paligemma"])
def test_quick_invariants(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    base = logits(model, inputs)
    fast, kept = _fast(model, inputs, ls.FastV(k=1, r=1e-6))
    valid = inputs["attention_mask"].bool()
    for b in range(2):
        slots = kept[b][kept[b] >= 0]
        torch.testing.assert_close(fast[b, kept[b] >= 0], base[b, slots], **TOL)
    with ls.steer(model, ls.FastV(k=1, r=0.5)) as steering:
        with torch.no_grad():
            seq, steps = greedy_with_logits(model, inputs, steps=3)
            stats = steering.stats()  # of the last prefill: the batch
            for row in (0, 1):
                seq1, steps1 = greedy_with_logits(model, batch(processor, rows=(row,)), steps=3)
                torch.testing.assert_close(steps[row], steps1[0], **TOL)
    image = (inputs["input_ids"] == model.config.image_token_id) & valid
    assert stats.per_layer[0] == valid.sum(1).tolist()
    assert stats.per_layer[1] == (valid.sum(1) - image.sum(1) + torch.floor(image.sum(1) * 0.5 + 0.5)).long().tolist()


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=-1), r"k must be an integer layer index >= 0"),
        (dict(r=1.0), r"r .* must be in \[0, 1\)"),
        (dict(r=-0.1), r"r .* must be in \[0, 1\)"),
        (dict(score="max"), r"score must be one of last, mean"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(MethodConfigError, match=match):
        ls.FastV(**kwargs)


def test_k_out_of_range_leaves_model_unwrapped():
    model, _ = _model("llava")
    hooks = our_hooks(model)
    n = model.config.text_config.num_hidden_layers
    with pytest.raises(MethodConfigError, match=rf"k must be in \[0, {n}\)"):
        ls.steer(model, ls.FastV(k=n))
    assert our_hooks(model) == hooks
    assert model.config.text_config._attn_implementation == "sdpa"


def test_needs_images():
    model, processor = _model("llava")
    inputs = dict(processor.tokenizer(["no image here"], return_tensors="pt"))
    with ls.steer(model, ls.FastV()):
        with pytest.raises(MissingImagesError, match="fastv"):
            logits(model, inputs)


def test_sliding_window_models_are_refused():
    model, _ = _model("gemma3")
    hooks = our_hooks(model)
    with pytest.raises(MethodConfigError, match="sliding"):
        ls.steer(model, ls.FastV())
    assert our_hooks(model) == hooks


def test_spec_and_conflicts():
    model, processor = _model("llava")
    method = ls.parse_spec("fastv:k=1,r=0.75,score=mean")
    assert (method.k, method.r, method.score) == (1, 0.75, "mean")
    assert method.spec() == "fastv:k=1,r=0.75,score=mean"
    with pytest.raises(ConflictError, match="attention of layer 2"):
        ls.steer(model, ls.FastV(k=1), ls.VAR(start_layer=2, skip_last=False))
    with ls.steer(model, ls.FastV(k=1), ls.AblateHeads({2: [0]})):  # head edits combine with pruning
        logits(model, batch(processor))


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_base_matches_sdpa_base(arch):
    """Under a user's eager attention (float additive masks) FastV keeps the same tokens and gives the same
    logits as under sdpa (bool masks), prefill and cached decode of a left-padded batch."""
    model, processor = _model(arch)
    inputs = batch(processor)
    method = ls.FastV(k=2, r=0.5)
    sdpa, kept = _fast(model, inputs, method)
    with torch.no_grad():
        with ls.steer(model, method):
            _, sdpa_steps = greedy_with_logits(model, inputs, steps=3)
        model.set_attn_implementation({"text_config": "eager"})
        try:
            eager, eager_kept = _fast(model, inputs, method)
            with ls.steer(model, method):
                _, eager_steps = greedy_with_logits(model, inputs, steps=3)
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
    assert torch.equal(kept, eager_kept)
    torch.testing.assert_close(eager[kept >= 0], sdpa[kept >= 0], **TOL)
    torch.testing.assert_close(eager_steps, sdpa_steps, **TOL)


def test_sequence_longer_than_sliding_window_is_refused():
    model, processor = _model("mistral3")
    cfg = model.config.text_config
    window = cfg.sliding_window
    inputs = batch(processor)
    cfg.sliding_window = inputs["input_ids"].shape[1] - 1
    try:
        with ls.steer(model, ls.FastV(k=1)):
            with pytest.raises(ls.SteeringError, match="sliding window"):
                logits(model, inputs)
    finally:
        cfg.sliding_window = window
