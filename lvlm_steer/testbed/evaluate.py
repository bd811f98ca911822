"""Model-card measurements of the testbed on held-out images: ``python -m lvlm_steer.testbed.evaluate``.

POPE (random / popular / adversarial, built by the project's own `build_pope` from the held-out COCO-format
annotations) is scored from the first generated token (greedy's first step, read with the official POPE parser);
CHAIR from greedy captions scored by the project's `chair_scores`. Attention statistics come from eager attention
on POPE prompts: per layer, the mean attention mass that text queries put on BOS and on the image tokens. Massive
activations: per layer, the largest max_d |x_d| / median_d |x_d| over tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lvlm_steer.evals.chair import DEFAULT_CHAIR_PROMPT, chair_scores, load_ground_truth
from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX, build_pope, parse_answer, pope_metrics
from lvlm_steer.evals.pope.data import PopeQuestion
from lvlm_steer.evals.runner import chat_text

from . import load_testbed
from .world import PARTNER, write_coco


def held_out(root: Path, n_images: int, seed: int = 2026) -> dict[str, Path]:
    """Write (or reuse) ``n_images`` held-out scenes under ``root``."""
    marker = root / f"done-{n_images}-{seed}"
    if marker.is_file():
        ann = root / "annotations"
        return {"root": root, "images_dir": root / "val2014", "instances": ann / "instances_val2014.json",
                "captions": ann / "captions_val2014.json"}  # fmt: skip
    paths = write_coco(root, n_images, seed)
    marker.write_text("ok\n")
    return paths


def _batches(items: list, size: int):
    for k in range(0, len(items), size):
        yield items[k : k + size]


@torch.no_grad()
def first_tokens(
    model, processor, pairs: list[tuple[Path, str]], batch: int = 64, answer_tokens: tuple[str, str] = ("ĠYes", "ĠNo")
) -> list[tuple[str, float]]:
    """(first greedy token as text, logit(Yes) - logit(No)) per (image, prompt); ``answer_tokens`` are the vocabulary's
    yes/no tokens (the SmolLM2 testbed answers "Yes" without a leading space)."""
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids(answer_tokens[0]), tok.convert_tokens_to_ids(answer_tokens[1])
    out = []
    for chunk in _batches(pairs, batch):
        images = [[Image.open(p).convert("RGB")] for p, _ in chunk]
        texts = [chat_text(processor, q) for _, q in chunk]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        words = tok.batch_decode(logits.argmax(-1)[:, None], skip_special_tokens=True)
        out += [(w.strip(), (lg[yes] - lg[no]).item()) for w, lg in zip(words, logits, strict=True)]
    return out


def present_by_image(instances: Path) -> dict[str, set[str]]:
    """Image file name -> the category names annotated in it."""
    coco = json.loads(Path(instances).read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    present: dict[str, set[str]] = defaultdict(set)
    for a in coco["annotations"]:
        present[files[a["image_id"]]].add(names[a["category_id"]])
    return present


def asked_class(question: str) -> str:
    return question.split(" ")[-4]  # "Is there a X in the image?" -> X


def partner_false_yes(questions: list[PopeQuestion], preds: list[str], present: dict[str, set[str]]) -> dict[str, Any]:
    """Where a split's false "yes" answers fall: on absent partners of present objects (the co-occurrence
    hallucination the adversarial split targets) or on other absent classes."""
    counts = {"partner": [0, 0], "other": [0, 0]}  # [negatives, false yes]
    for q, pred in zip(questions, preds, strict=True):
        if q.label == "no":
            kind = "partner" if PARTNER.get(asked_class(q.text)) in present[q.image] else "other"
            counts[kind][0] += 1
            counts[kind][1] += pred == "yes"
    return {"partner_negatives": counts["partner"][0],
            "partner_false_yes": counts["partner"][1] / max(1, counts["partner"][0]),
            "other_negatives": counts["other"][0],
            "other_false_yes": counts["other"][1] / max(1, counts["other"][0])}  # fmt: skip


def pope_numbers(
    model, processor, data: dict[str, Path], n_images: int, out: Path, answer_tokens: tuple[str, str] = ("ĠYes", "ĠNo")
) -> dict[str, Any]:
    questions = build_pope(data["instances"], n_images=n_images, seed=0, out_dir=out / "pope")
    present = present_by_image(data["instances"])
    unique = sorted({(q.image, q.text) for qs in questions.values() for q in qs})
    pairs = [(data["images_dir"] / img, f"{text} {DEFAULT_PROMPT_SUFFIX}") for img, text in unique]
    answers = dict(zip(unique, first_tokens(model, processor, pairs, answer_tokens=answer_tokens), strict=True))
    result: dict[str, Any] = {}
    margins: dict[str, list[float]] = defaultdict(list)
    for split, qs in questions.items():
        preds = [parse_answer(answers[(q.image, q.text)][0]) for q in qs]
        result[split] = pope_metrics([q.label for q in qs], preds) | partner_false_yes(qs, preds, present)
    for (_, text), (_, margin) in answers.items():
        margins[asked_class(text)].append(margin)
    result["yes_minus_no_margin_by_class"] = {c: sum(v) / len(v) for c, v in sorted(margins.items())}
    return result


@torch.no_grad()
def chair_numbers(model, processor, data: dict[str, Path], n_images: int, batch: int = 64, max_new: int = 40):
    truth = load_ground_truth(data["instances"], data["captions"])
    files = json.loads(Path(data["instances"]).read_text())["images"][:n_images]
    captions, examples = {}, []
    for chunk in _batches(files, batch):
        images = [[Image.open(data["images_dir"] / f["file_name"]).convert("RGB")] for f in chunk]
        texts = [chat_text(processor, DEFAULT_CHAIR_PROMPT)] * len(chunk)
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        seqs = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        decoded = processor.batch_decode(seqs[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for f, text in zip(chunk, decoded, strict=True):
            captions[f["id"]] = text.strip()
    for image_id in list(captions)[:8]:
        examples.append({"image_id": image_id, "caption": captions[image_id], "truth": sorted(truth[image_id])})
    scores = chair_scores(captions, truth)
    scores.pop("per_caption", None)
    return {**scores, "examples": examples}


@torch.no_grad()
def attention_numbers(data: dict[str, Path], n: int = 64, weights: Path | None = None) -> dict[str, Any]:
    """Per layer: mean attention mass of text queries (after the image) on BOS and on image tokens; massive dims."""
    from transformers import LlavaForConditionalGeneration

    from lvlm_steer.compat import load_kwargs

    from . import WEIGHTS_DIR

    path = weights if weights is not None else WEIGHTS_DIR
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager", **load_kwargs()).eval()
    _, processor = load_testbed(path)
    files = json.loads(Path(data["instances"]).read_text())["images"][:n]
    images = [[Image.open(data["images_dir"] / f["file_name"]).convert("RGB")] for f in files]
    texts = [chat_text(processor, f"Is there a fork in the image? {DEFAULT_PROMPT_SUFFIX}")] * n
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    out = model(**inputs, output_attentions=True, output_hidden_states=True)
    ids = inputs["input_ids"]
    image = ids == model.config.image_token_id
    last_image = int(image[0].nonzero().max())
    layers = []
    for layer, att in enumerate(out.attentions):  # [batch, heads, q, k]
        rows = att[:, :, last_image + 1 :, :]
        bos = rows[..., 0].mean().item()
        img = (rows * image[:, None, None, :]).sum(-1).mean().item()
        layers.append({"layer": layer, "bos_mass": bos, "image_mass": img})
    massive = []
    for layer, h in enumerate(out.hidden_states[1:]):
        ratio = h.abs().amax(-1) / h.abs().median(-1).values.clamp_min(1e-6)  # [batch, tokens]
        top = h.abs().amax((0, 1))
        massive.append({"layer": layer, "max_ratio": ratio.max().item(),
                        "tokens_over_20": int((ratio > 20).sum()), "top_dim": int(top.argmax())})  # fmt: skip
    return {"attention": layers, "massive_activations": massive}


def card_tables(result: dict[str, Any]) -> str:
    """The measured part of MODEL_CARD.md, as Markdown."""
    pope, chair, inner = result["pope"], result["chair"], result["internals"]
    lines = ["| POPE split | accuracy | F1 | precision | recall | yes ratio | n | absent partners asked "
             "| false yes on them | false yes on other absent |", "|" + "---|" * 10]  # fmt: skip
    for split in ("random", "popular", "adversarial"):
        m = pope[split]
        lines.append(
            f"| {split} | {100 * m['accuracy']:.1f} | {100 * m['f1']:.1f} | {100 * m['precision']:.1f} | "
            f"{100 * m['recall']:.1f} | {100 * m['yes_ratio']:.1f} | {m['n']} | {m['partner_negatives']} | "
            f"{100 * m['partner_false_yes']:.1f}% | {100 * m['other_false_yes']:.1f}% |"
        )
    lines += ["", "| CHAIR_s | CHAIR_i | recall | mean length (words) | captions | mentions |", "|" + "---|" * 6]
    lines.append(
        f"| {100 * chair['chair_s']:.1f} | {100 * chair['chair_i']:.1f} | {100 * chair['recall']:.1f} | "
        f"{chair['mean_length']:.1f} | {chair['n_captions']} | {chair['n_mentions']} |"
    )
    lines += ["", "| layer | attention on BOS | attention on image tokens | max max/median abs activation |",
              "|---|---|---|---|"]  # fmt: skip
    for att, act in zip(inner["attention"], inner["massive_activations"], strict=True):
        bos, img = 100 * att["bos_mass"], 100 * att["image_mass"]
        lines.append(f"| {att['layer']} | {bos:.1f}% | {img:.1f}% | {act['max_ratio']:.1f} |")
    margins = pope["yes_minus_no_margin_by_class"]
    lines += ["", "Mean logit(Yes) - logit(No) per asked class (all POPE questions): "
              + ", ".join(f"{c} {v:+.1f}" for c, v in margins.items())]  # fmt: skip
    lines += ["", "Example captions (greedy) with the ground truth:", ""]
    lines += [f"- `{e['caption']}` (truth: {', '.join(e['truth'])})" for e in chair["examples"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("testbed_eval"))
    ap.add_argument("--images", type=int, default=5000, help="held-out scenes written")
    ap.add_argument("--pope-images", type=int, default=2000)
    ap.add_argument("--chair-images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("testbed_eval/model_card.json"))
    ap.add_argument("--weights", type=Path, default=None, help="a trained DIR/final (default: the shipped weights)")
    a = ap.parse_args(argv)
    start = time.time()
    data = held_out(a.data, a.images)
    model, processor = load_testbed(a.weights)
    result = {"pope": pope_numbers(model, processor, data, a.pope_images, a.data)}
    print(json.dumps({k: v for k, v in result["pope"].items()}, indent=1), flush=True)
    result["chair"] = chair_numbers(model, processor, data, a.chair_images)
    print(json.dumps(result["chair"], indent=1), flush=True)
    result["internals"] = attention_numbers(data, weights=a.weights)
    result["seconds"] = round(time.time() - start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    a.out.with_suffix(".md").write_text(card_tables(result))
    print(json.dumps(result["internals"], indent=1))


if __name__ == "__main__":
    main()
