"""`lvlm-steer bench pruning`: what visual-token pruning buys in time and memory, next to its FLOPs reduction.

Conditions: the unwrapped model, FastV K=2 with R=0.5 and R=0.75 (pruning inside the LLM), and VTC-CLS keeping
25% of each image's tokens (pruning before the LLM). Models:
- ``bench`` / ``bench:small``: the benchmark model (SmolVLM-256M architecture, 1088 image tokens in ``full``);
- ``llava15``: a LLaVA-1.5-7B-shaped Llava built from a config with random weights: CLIP-like tower at 336 px,
  patch 14 (576 patches plus CLS), features from its penultimate layer; text model hidden 4096, 32 heads,
  FFN 11008, but only ``LLAVA_TEXT_LAYERS`` layers (and a shallower tower) to fit 2 CPU cores and the RAM;
  ``llava15:tiny`` is the same layout at toy width, for tests.

Each run is one greedy generation of exactly ``new_tokens`` tokens (through the steering handle, which VTC-CLS
needs). A forward timer gives the LLM prefill (the first forward), the time to first token (from the call,
so vision encoding and VTC-CLS's scoring count) and decode tokens/s; the peak resident memory over what the
process held before the run is read per run (the kernel's peak counter is reset first). Conditions are
interleaved in rotating rounds after one warm-up each (`lvlm_steer.bench.timing`): medians over ``runs``, the
spread of each condition and of each per-round ratio under ``spread``, and the unreliable ratios listed.
The FLOPs reduction is FastV's Eq. 5 from `Steering.stats()` (prefill, text layers only), printed next to the
measured prefill speed-up.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import lvlm_steer as ls
from lvlm_steer.bench.timing import (
    ForwardTimer,
    compare,
    environment,
    interleaved,
    median,
    reset_peak_rss,
    rss_mib,
    unreliable_ratios,
)
from lvlm_steer.stats import PrefillStats

DEFAULT_MODELS = ("bench", "llava15")
MODEL_SPECS = ("bench", "bench:small", "llava15", "llava15:tiny")
LLAVA_TEXT_LAYERS = 4
LLAVA_VISION_LAYERS = 4  # features from layer 2 (the penultimate); VTC-CLS scores layers 1..2
LLAVA_SHAPES = {
    "full": dict(vision=(1024, 4096, 16, 336), text=(4096, 11008, 32)),
    "tiny": dict(vision=(32, 64, 2, 56), text=(64, 128, 4)),
}
REAL_TEXT_LAYERS = {"llava15": 32, "bench": 30}  # LLaVA-1.5-7B, SmolVLM-256M
TIMED = ("prefill_s", "ttft_s", "decode_tokens_per_s", "generate_s")  # compared per round with the unwrapped run
LLAVA_PROMPT = (35, 25)  # text tokens before the image (LLaVA's system prompt) and after it (question)


def llava15_model(size: str = "full", text_layers: int = LLAVA_TEXT_LAYERS, vision_layers: int = LLAVA_VISION_LAYERS,
                  seed: int = 0) -> tuple[Any, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """(model, inputs, description): a LLaVA-1.5-shaped Llava with random weights and one synthetic prompt."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    (v_hidden, v_ffn, v_heads, image), (hidden, ffn, heads) = LLAVA_SHAPES[size]["vision"], LLAVA_SHAPES[size]["text"]
    vision = CLIPVisionConfig(
        hidden_size=v_hidden, intermediate_size=v_ffn, num_attention_heads=v_heads, num_hidden_layers=vision_layers,
        image_size=image, patch_size=14,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=heads,
        num_hidden_layers=text_layers, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    patches = (image // 14) ** 2
    before, after = LLAVA_PROMPT
    gen = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(10, 32000, (before + after,), generator=gen)
    ids = torch.cat([torch.tensor([1]), text_ids[: before - 1], torch.full((patches,), 32000), text_ids[before:]])
    inputs = {
        "input_ids": ids[None],
        "attention_mask": torch.ones(1, ids.shape[0], dtype=torch.long),
        "pixel_values": torch.randn(1, 3, image, image, generator=gen),
    }
    description = {
        "name": f"llava15:{size}" if size != "full" else "llava15",
        "architecture": type(model).__name__,
        "weights": f"random (seed {seed})",
        "text": f"{text_layers} layers (real: 32) x hidden {hidden}, {heads} heads, FFN {ffn}",
        "vision": f"CLIP-like, {vision_layers} layers (real: 24) x {v_hidden}, {image} px / patch 14, CLS, "
        "features from the penultimate layer",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, inputs, description


def load(spec: str) -> tuple[Any, Any, dict[str, Any], dict[str, Any], int]:
    """(model, processor, inputs, description, VTC-CLS start layer) for a model spec."""
    if spec not in MODEL_SPECS:
        raise ValueError(f"unknown model {spec!r} for bench pruning; choose from {', '.join(MODEL_SPECS)}")
    if spec.startswith("llava15"):
        model, inputs, description = llava15_model("tiny" if spec.endswith(":tiny") else "full")
        return model, None, inputs, description, LLAVA_VISION_LAYERS - 3  # the layer before the feature layer
    from lvlm_steer.bench.model import benchmark_inputs, benchmark_model

    model, processor, description = benchmark_model("small" if spec.endswith(":small") else "full")
    return model, processor, benchmark_inputs(processor), description, 0  # its reduced tower has one layer


def conditions(vtc_start: int) -> dict[str, list[ls.Method] | None]:
    return {
        "unwrapped": None,
        "fastv_k2_r0.5": [ls.parse_spec("fastv:k=2,r=0.5")],
        "fastv_k2_r0.75": [ls.parse_spec("fastv:k=2,r=0.75")],
        "vtc_cls_keep0.25": [ls.VTCCLS(keep=0.25, start_layer=vtc_start)],
    }


class _Clock(ForwardTimer):
    """A forward timer that also notes when the first forward (the prefill) ended."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.first_end: float | None = None

    def _post(self, module, args, output) -> None:
        super()._post(module, args, output)
        if self.first_end is None:
            self.first_end = time.perf_counter()


def reduction_at_depth(stats: PrefillStats, depth: int) -> float:
    """FLOPs reduction if the model had ``depth`` text layers, the extra ones seeing the last layer's tokens.

    Benchmark models are cut to a few layers; FastV's reduction grows with depth ((T - K) / T of the layers are
    pruned), so this gives the figure for the real model next to the measured one.
    """
    per_layer = stats.per_layer + [stats.per_layer[-1]] * max(0, depth - stats.num_layers)
    return PrefillStats(stats.hidden_size, stats.intermediate_size, stats.unpruned, per_layer).reduction


def one_run(model, processor, inputs: dict[str, Any], methods: list[ls.Method] | None, new_tokens: int,
            real_depth: int | None = None) -> dict:  # fmt: skip
    """One greedy generation under ``methods`` (None: unwrapped): timings, peak memory, FLOPs reduction."""
    reset_peak_rss()
    before = rss_mib()
    steering = ls.steer(model, *methods, processor=processor) if methods is not None else None
    try:
        generate = steering.generate if steering is not None else model.generate
        with _Clock(model) as clock, torch.inference_mode():
            start = time.perf_counter()
            generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                suppress_tokens=[model.config.image_token_id],
            )  # fmt: skip
            total = time.perf_counter() - start
        stats = steering.stats() if steering is not None else None
    finally:
        if steering is not None:
            steering.remove()
    decode = clock.durations[1:]
    return {
        "prefill_s": clock.durations[0],
        "ttft_s": clock.first_end - start,
        "decode_tokens_per_s": len(decode) / sum(decode) if decode else float("nan"),
        "generate_s": total,
        "extra_peak_rss_mib": rss_mib("VmHWM") - before,
        "flops_reduction": stats.reduction if stats is not None else 0.0,
        "flops_reduction_real_depth": reduction_at_depth(stats, real_depth) if stats and real_depth else 0.0,
        "last_layer_tokens": stats.tokens_per_layer[-1] if stats is not None else None,
    }


def bench_model(spec: str, runs: int, new_tokens: int, progress=print) -> dict[str, Any]:
    progress(f"{spec}: building")
    model, processor, inputs, description, vtc_start = load(spec)
    depth = REAL_TEXT_LAYERS[spec.split(":")[0]]
    conds = conditions(vtc_start)

    def report(name: str, round_index: int, r: dict[str, Any]) -> None:
        progress(
            f"{spec} round {round_index}/{runs} {name}: prefill {r['prefill_s']:.3f} s, ttft {r['ttft_s']:.3f} s, "
            f"decode {r['decode_tokens_per_s']:.2f} tok/s, FLOPs -{100 * r['flops_reduction']:.1f}% "
            f"(-{100 * r['flops_reduction_real_depth']:.1f}% at {depth} layers)"
        )

    progress(f"{spec}: warm-up {', '.join(conds)}")
    raw = interleaved(
        list(conds),
        runs,
        lambda name: one_run(model, processor, inputs, conds[name], new_tokens, depth),
        progress=report,
    )
    comparison = compare(raw, "unwrapped", TIMED)
    summary = {}
    for name, rs in raw.items():
        summary[name] = {k: median([r[k] for r in rs]) for k in rs[0] if k != "last_layer_tokens"}
        summary[name]["last_layer_tokens"] = rs[0]["last_layer_tokens"]
        summary[name]["prefill_s_min"] = min(r["prefill_s"] for r in rs)  # least disturbed by other processes
    base = summary["unwrapped"]
    for name, s in summary.items():
        per_round = comparison[name]
        ratio = {k: per_round[k]["vs_unwrapped"]["ratio"] if name != "unwrapped" else 1.0 for k in TIMED}
        s["prefill_speedup"] = 1.0 / ratio["prefill_s"]  # medians of per-round ratios (bench.timing)
        s["prefill_speedup_min"] = base["prefill_s_min"] / s["prefill_s_min"]
        s["ttft_speedup"] = 1.0 / ratio["ttft_s"]
        s["decode_vs_unwrapped"] = ratio["decode_tokens_per_s"]
        s["extra_peak_rss_vs_unwrapped_mib"] = s["extra_peak_rss_mib"] - base["extra_peak_rss_mib"]
        s["flops_speedup_bound"] = 1.0 / (1.0 - s["flops_reduction"]) if s["flops_reduction"] < 1 else None
    ids = inputs["input_ids"]
    return {
        "model": description,
        "prompt_tokens": int(ids.shape[1]),
        "image_tokens": int((ids == model.config.image_token_id).sum()),
        "vtc_cls_start_layer": vtc_start,
        "real_text_layers": depth,
        "summary": summary,
        "spread": comparison,
        "unreliable": unreliable_ratios(comparison),
        "raw": raw,
    }


def run_pruning_bench(models: list[str] | tuple[str, ...] = DEFAULT_MODELS, runs: int = 3, new_tokens: int = 16,
                      progress=print) -> dict[str, Any]:  # fmt: skip
    for spec in models:
        if spec not in MODEL_SPECS:
            raise ValueError(f"unknown model {spec!r} for bench pruning; choose from {', '.join(MODEL_SPECS)}")
    results = {}
    for spec in models:
        results[spec] = bench_model(spec, runs, new_tokens, progress)
    return {
        "benchmark": "pruning",
        "runs": runs,
        "new_tokens": new_tokens,
        "flops": "FastV Eq. 5 per text layer, prefill only: C(n) = 4nd^2 + 2n^2d + 2ndm",
        "columns": {
            "prefill_speedup": "unwrapped LLM prefill time / this condition's (first forward only), per round; median",
            "prefill_speedup_min": "the same from the fastest run of each condition (robust on a shared host)",
            "ttft_speedup": "time to first token, vision tower and VTC-CLS scoring included",
            "flops_speedup_bound": "1 / (1 - FLOPs reduction): the prefill speed-up if time followed FLOPs",
            "flops_reduction_real_depth": "the FLOPs reduction at the real model's depth (extra layers see the "
            "last layer's tokens): FastV prunes (T - K) / T of the layers, so a cut model understates it",
        },
        "models": results,
        "environment": environment(),
    }
