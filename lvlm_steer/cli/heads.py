"""``heads scan`` (per-head VHD and image share) and ``heads ablate`` (answers with and without some heads)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lvlm_steer as ls
from lvlm_steer.cli.common import add_model_args, chat_inputs, image_files, load, load_image, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    hd = sub.add_parser("heads", help="head tooling: scan heads, ablate heads")
    hd_sub = hd.add_subparsers(dest="heads_command", required=True)
    scan = hd_sub.add_parser("scan", help="per layer x head VHD and image-attention share (JSON, CSV, heatmaps)")
    add_model_args(scan)
    scan.add_argument("--images", required=True, help="an image file or a folder of images")
    scan.add_argument("--prompt", required=True)
    scan.add_argument("--limit", type=positive_int, default=None, help="first N images of a folder")
    scan.add_argument("--batch-size", type=positive_int, default=4)
    scan.add_argument("--top", type=positive_int, default=10)
    scan.add_argument("--out", type=Path, required=True, help="folder for heads.json, heads.csv, heads.png")
    scan.set_defaults(handler=lambda args: print(cmd_heads_scan(args)))
    abl = hd_sub.add_parser("ablate", help="answers with and without ablating heads, and the answer's log-prob change")
    add_model_args(abl)
    abl.add_argument("--heads", required=True, help="layer.head list, e.g. 14.3,14.5")
    abl.add_argument("--mode", default="zero", help="zero | mean | constant")
    abl.add_argument("--image", required=True, help="image file (or 'random')")
    abl.add_argument("--prompt", required=True)
    abl.add_argument("--max-new-tokens", type=positive_int, default=32)
    abl.set_defaults(handler=print_heads_ablate)


def cmd_heads_scan(args: argparse.Namespace) -> str:
    from lvlm_steer.head_scan import scan_heads

    files = image_files(args.images, args.limit)
    model, processor = load(args)
    images = [load_image(str(f)) for f in files]
    scores = scan_heads(model, processor, images, args.prompt, args.batch_size, model_name=args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heads.json").write_text(scores.to_json())
    scores.to_csv(args.out / "heads.csv")
    scores.plot(args.out / "heads.png")
    lines = [f"{len(images)} image(s); top heads by VHD (layer.head: VHD, image share):"]
    share = scores.image_share
    lines += [f"  {layer}.{head}: {v:.3f}, {share[layer][head]:.3f}" for layer, head, v in scores.top(args.top)]
    lines.append(f"written: {args.out / 'heads.json'}, heads.csv, heads.png")
    return "\n".join(lines)


def cmd_heads_ablate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    method = ls.AblateHeads(args.heads, mode=args.mode)  # validate the spec before the load
    model, processor = load(args)
    inputs = chat_inputs(processor, load_image(args.image), args.prompt)
    prompt_len = inputs["input_ids"].shape[1]
    adapter = ls.adapter_for(model, processor)

    def answer() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)

    def answer_logprob(sequences: torch.Tensor) -> float:
        """Sum of log-probabilities of the generated tokens, teacher-forced (one uncached forward)."""
        with torch.inference_mode():
            logits = model(**adapter.extend_inputs(inputs, sequences), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[0, prompt_len - 1 : -1], dim=-1)
        return float(logp.gather(-1, sequences[0, prompt_len:, None]).sum())

    base = answer()
    base_logp = answer_logprob(base)
    with ls.steer(model, method, processor=processor):
        ablated = answer()
        base_logp_ablated = answer_logprob(base)
    decode = processor.batch_decode
    return {
        "heads": method.spec(),
        "none": decode(base[:, prompt_len:], skip_special_tokens=True)[0],
        "ablated": decode(ablated[:, prompt_len:], skip_special_tokens=True)[0],
        "answer_logprob": base_logp,
        "answer_logprob_ablated": base_logp_ablated,
        "delta_logprob": base_logp_ablated - base_logp,
    }


def print_heads_ablate(args: argparse.Namespace) -> None:
    r = cmd_heads_ablate(args)
    print(f"[none]    {r['none']}\n[ablated] {r['ablated']}   ({r['heads']})")
    print(
        f"log p(unablated answer): {r['answer_logprob']:.3f} -> {r['answer_logprob_ablated']:.3f} "
        f"with the ablation (change {r['delta_logprob']:+.3f})"
    )
