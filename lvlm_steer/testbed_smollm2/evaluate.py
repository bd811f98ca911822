"""Model-card measurements of the SmolLM2 testbed: ``python -m lvlm_steer.testbed_smollm2.evaluate --weights DIR``.

POPE (three splits) and CHAIR on held-out scenes come from the first testbed's evaluation code, unchanged. The
internals are what the toolkit's methods act on, measured on POPE prompts at the answer position (the last row): per
layer, the share of attention on token 0 (the sink), on the 64 image tokens and on the other text tokens; once with
the trained connector and once with a fresh, untrained one ("before training"), and for the question without the
image (the language model alone). ``find_sink_dims`` (``lvlm-steer sinks``) gives the massive-activation dims and the
sink tokens; image positions among them are VAR's "visual sink tokens".
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX
from lvlm_steer.evals.runner import chat_text
from lvlm_steer.sinks import find_sink_dims
from lvlm_steer.testbed.evaluate import card_tables, chair_numbers, held_out, pope_numbers

from . import load_testbed_smollm2
from .model import NO, YES


@contextmanager
def eager_attention(model):
    """Eager attention for one measurement (the probabilities are needed), then the model's own again."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def pope_prompts(processor, data: dict[str, Path], n: int, with_image: bool = True) -> dict[str, torch.Tensor]:
    """``n`` POPE-style prompts about the first held-out images (asked classes cycle through the vocabulary of the
    world), left-padded, with or without the image."""
    from lvlm_steer.testbed.world import NAMES, article

    files = json.loads(Path(data["instances"]).read_text())["images"][:n]
    names = list(NAMES.values())
    questions = [f"Is there {article(names[i % len(names)])} in the image? {DEFAULT_PROMPT_SUFFIX}" for i in range(n)]
    if not with_image:
        texts = [processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                 for q in questions]  # fmt: skip
        return dict(processor.tokenizer(texts, padding=True, return_tensors="pt"))
    images = [[Image.open(data["images_dir"] / f["file_name"]).convert("RGB")] for f in files]
    texts = [chat_text(processor, q) for q in questions]
    return dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))


@torch.no_grad()
def last_row_shares(model, inputs: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """Per layer, the mean (over heads and prompts) attention of the last position on token 0 (the first real
    token of each left-padded row), on image tokens and on the other text tokens."""
    with eager_attention(model):
        out = model(**inputs, output_attentions=True, use_cache=False, logits_to_keep=1)
    mask = inputs["attention_mask"].bool()
    first = mask.float().argmax(1)  # first real token per row
    keys = torch.arange(mask.shape[1])
    sink = keys[None, :] == first[:, None]
    image = inputs["input_ids"] == model.config.image_token_id
    text = mask & ~sink & ~image
    rows = []
    for layer, att in enumerate(out.attentions):
        last = att[:, :, -1, :].float().mean(1)  # (B, K), mean over heads
        share = {name: (last * where).sum(-1).mean().item() for name, where in
                 (("sink", sink), ("image", image), ("text", text))}  # fmt: skip
        rows.append({"layer": layer, **share})
    return rows


def sink_numbers(model, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``find_sink_dims`` on the prompts: its dims, and where its sink tokens sit (token 0, image, other text)."""
    report = find_sink_dims(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    first = inputs["attention_mask"].float().argmax(1)
    kinds = {"first": 0, "image": 0, "text": 0}
    for row, pos in report.sink_positions():
        kinds["first" if pos == int(first[row]) else "image" if bool(image[row, pos]) else "text"] += 1
    return {"dims": list(report.dims), "ratios": list(report.ratios), "sink_tokens": kinds,
            "layers_scanned": len(report.layers)}  # fmt: skip


def internals(model, processor, data: dict[str, Path], n: int = 32, seed: int = 0) -> dict[str, Any]:
    """Attention shares and sinks with the trained connector, an untrained one, and without the image."""
    with_image = pope_prompts(processor, data, n)
    result = {"trained": last_row_shares(model, with_image), "sinks_trained": sink_numbers(model, with_image),
              "text_only": last_row_shares(model, pope_prompts(processor, data, n, with_image=False))}  # fmt: skip
    projector = model.model.multi_modal_projector
    trained = {k: v.clone() for k, v in projector.state_dict().items()}
    torch.manual_seed(seed)
    projector.load_state_dict(type(projector)(model.config).state_dict())  # a fresh connector: "before training"
    try:
        result["untrained"] = last_row_shares(model, with_image)
        result["sinks_untrained"] = sink_numbers(model, with_image)
    finally:
        projector.load_state_dict(trained)
    return result


def internals_table(inner: dict[str, Any]) -> str:
    """Markdown: per layer, sink / image / text shares before and after training, and text-only sink share."""
    lines = ["| layer | sink (trained) | image (trained) | text (trained) | sink (untrained) | image (untrained) "
             "| sink (no image) |", "|" + "---|" * 7]  # fmt: skip
    for t, u, x in zip(inner["trained"], inner["untrained"], inner["text_only"], strict=True):
        lines.append(f"| {t['layer']} | {100 * t['sink']:.1f}% | {100 * t['image']:.1f}% | {100 * t['text']:.1f}% | "
                     f"{100 * u['sink']:.1f}% | {100 * u['image']:.1f}% | {100 * x['sink']:.1f}% |")  # fmt: skip
    for key in ("sinks_trained", "sinks_untrained"):
        s = inner[key]
        dims = ", ".join(f"{d} ({r:.0f}x)" for d, r in zip(s["dims"], s["ratios"], strict=True)) or "none"
        kinds = s["sink_tokens"]
        lines.append(f"\n{key.replace('_', ' ')}: dims {dims}; sink tokens (distinct prompt positions) by kind {kinds}")
    return "\n".join(lines) + "\n"


def bars(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's bars, computed from the measurements."""
    pope, inner = result["pope"], result["internals"]
    sink_layers = sum(r["sink"] >= 0.3 for r in inner["trained"])
    return {"pope_random": pope["random"]["accuracy"], "adversarial_gap": pope["random"]["accuracy"]
            - pope["adversarial"]["accuracy"], "chair_i": result["chair"]["chair_i"],
            "layers_sink_over_30pct": f"{sink_layers}/{len(inner['trained'])}",
            "sink_dims_found": bool(inner["sinks_trained"]["dims"])}  # fmt: skip


def card_input(result: dict[str, Any]) -> dict[str, Any]:
    """The first testbed's card layout: its per-layer columns are token 0 and image tokens."""
    rows = result["internals"]["trained"]
    inner = {"attention": [{"layer": r["layer"], "bos_mass": r["sink"], "image_mass": r["image"]} for r in rows],
             "massive_activations": [{"max_ratio": float("nan")} for _ in rows]}  # fmt: skip
    return {**result, "internals": inner}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("testbed_eval"), help="held-out scenes (shared with testbed)")
    ap.add_argument("--images", type=int, default=5000, help="held-out scenes written")
    ap.add_argument("--pope-images", type=int, default=500, help="-> 6 questions each per split")
    ap.add_argument("--chair-images", type=int, default=500)
    ap.add_argument("--attention-prompts", type=int, default=32)
    ap.add_argument("--weights", type=Path, default=None, help="a trained DIR/final or DIR/stepN (default: shipped)")
    ap.add_argument("--out", type=Path, default=Path("testbed_eval/model_card_smollm2.json"))
    ap.add_argument("--skip-chair", action="store_true", help="POPE and internals only (quick checkpoint checks)")
    a = ap.parse_args(argv)
    start = time.time()
    data = held_out(a.data, a.images)
    model, processor = load_testbed_smollm2(a.weights)
    result: dict[str, Any] = {"weights": str(a.weights or "shipped")}
    result["pope"] = pope_numbers(model, processor, data, a.pope_images, a.data, answer_tokens=(YES, NO))
    print(json.dumps(result["pope"], indent=1), flush=True)
    result["chair"] = (
        {"chair_s": float("nan"), "chair_i": float("nan"), "recall": float("nan"), "mean_length": float("nan"),
         "n_captions": 0, "n_mentions": 0, "examples": []}
        if a.skip_chair else chair_numbers(model, processor, data, a.chair_images, batch=32)
    )  # fmt: skip
    print(json.dumps(result["chair"], indent=1), flush=True)
    result["internals"] = internals(model, processor, data, a.attention_prompts)
    result["bars"] = bars(result)
    result["seconds"] = round(time.time() - start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    blocks = card_tables(card_input(result)).split("\n\n")  # POPE, CHAIR, margins, examples; not its layer table
    tables = "\n\n".join(b for b in blocks if not b.startswith("| layer |"))
    md = tables.rstrip() + "\n\n" + internals_table(result["internals"]) + "\nbars: " + json.dumps(result["bars"])
    a.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"done in {result['seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
