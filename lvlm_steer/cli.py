"""The ``lvlm-steer`` command line: argument parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lvlm_steer as ls
from lvlm_steer.errors import SteeringError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlm-steer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an answer for one image, with and without methods")
    _model_args(gen)
    gen.add_argument("--image", required=True, help="image file (use 'random' for a generated test image)")
    gen.add_argument("--prompt", required=True, help="the user's question or instruction")
    gen.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="method spec, e.g. ablate:heads=14.3,14.5,mode=mean (repeat to combine)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--compare", action="store_true", help="also print the unsteered answer")
    gen.add_argument("--json", action="store_true", help="print JSON instead of text")

    sub.add_parser("methods", help="list methods with their parameters and defaults")
    demo = sub.add_parser("demo", help="every method vs none on the built-in testbed (POPE + CHAIR), offline")
    demo.add_argument("--out", type=Path, default=Path("lvlm-steer-demo"), help="report and data folder")
    demo.add_argument("--limit", type=int, default=None, help="questions per POPE split and CHAIR images (quick)")
    demo.add_argument("--method", action="append", default=None, metavar="SPEC", help="only these conditions")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--model", default="builtin:testbed", help="builtin:testbed (default) or builtin:testbed-smollm2")
    sub.add_parser("models", help="list supported architectures")

    ev = sub.add_parser("eval", help="hallucination evals (POPE, CHAIR) with one or more methods")
    ev_sub = ev.add_subparsers(dest="task", required=True)
    pope = ev_sub.add_parser("pope", help="POPE yes/no object questions")
    _model_args(pope)
    _eval_args(pope, batch_size=8, max_new_tokens=16)
    pope.add_argument(
        "--questions",
        action="append",
        required=True,
        metavar="FILE",
        help="POPE question file (JSON lines or JSON array); repeat for several splits",
    )
    pope.add_argument("--parser", default="pope", help="answer parser: pope (official), vcd, lmms, vlmeval")
    pope.add_argument("--prompt-suffix", default=None, help="text after each question (default: the common one)")
    pope.add_argument("--limit", type=int, default=None, help="first N questions of each file (quick runs)")
    chair = ev_sub.add_parser("chair", help="CHAIR object hallucination in image captions")
    _model_args(chair)
    _eval_args(chair, batch_size=8, max_new_tokens=512)
    chair.add_argument("--coco-annotations", required=True, help="folder with instances_*.json (+ captions_*.json)")
    chair.add_argument("--n-images", type=int, default=500)
    chair.add_argument("--seed", type=int, default=0)
    chair.add_argument("--prompt", default=None, help="caption prompt (default: the CHAIR protocol's)")

    cal = sub.add_parser("calibrate", help="choose a method's heads on labelled data")
    cal_sub = cal.add_subparsers(dest="calibrate", required=True)
    act = cal_sub.add_parser("act", help="ACT heads: accuracy with vs without calibrating each head alone")
    _model_args(act)
    act.add_argument("--images", required=True)
    act.add_argument("--questions", action="append", required=True, metavar="FILE", help="labelled yes/no questions")
    act.add_argument("--layers", default=None, help="candidate layers, e.g. 2-30 or 4,5,6 (default 2..L-2)")
    act.add_argument("--limit", type=int, default=None, help="first N questions of each file")
    act.add_argument("--beta", type=float, default=0.4)
    act.add_argument("--threshold", type=float, default=0.1)
    act.add_argument("--batch-size", type=int, default=8)
    act.add_argument("--out", type=Path, required=True, help="JSON with the head list and every head's score")
    act.add_argument("--no-progress", action="store_true")

    hd = sub.add_parser("heads", help="head tooling: scan heads, ablate heads")
    hd_sub = hd.add_subparsers(dest="heads_command", required=True)
    scan = hd_sub.add_parser("scan", help="per layer x head VHD and image-attention share (JSON, CSV, heatmaps)")
    _model_args(scan)
    scan.add_argument("--images", required=True, help="an image file or a folder of images")
    scan.add_argument("--prompt", required=True)
    scan.add_argument("--limit", type=int, default=None, help="first N images of a folder")
    scan.add_argument("--batch-size", type=int, default=4)
    scan.add_argument("--top", type=int, default=10)
    scan.add_argument("--out", type=Path, required=True, help="folder for heads.json, heads.csv, heads.png")
    abl = hd_sub.add_parser("ablate", help="answers with and without ablating heads, and the answer's log-prob change")
    _model_args(abl)
    abl.add_argument("--heads", required=True, help="layer.head list, e.g. 14.3,14.5")
    abl.add_argument("--mode", default="zero", help="zero | mean | constant")
    abl.add_argument("--image", required=True, help="image file (or 'random')")
    abl.add_argument("--prompt", required=True)
    abl.add_argument("--max-new-tokens", type=int, default=32)

    sk = sub.add_parser("sinks", help="find a model's sink (massive-activation) dimensions for VAR")
    _model_args(sk)
    sk.add_argument("--image", default="random")
    sk.add_argument("--prompt", default="Describe the image.")
    sk.add_argument("--out", type=Path, help="write the report JSON here")

    pb = sub.add_parser("pope", help="POPE question sets")
    pb_sub = pb.add_subparsers(dest="pope_command", required=True)
    build = pb_sub.add_parser("build", help="build random/popular/adversarial question files from COCO annotations")
    build.add_argument("--coco-annotations", required=True, help="instances_*.json, or the folder holding it")
    build.add_argument("--n-images", type=int, default=500)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", type=Path, required=True)

    rep = sub.add_parser("report", help="side-by-side table and bar chart of eval runs")
    rep.add_argument("runs", nargs="+", help="eval output folders")
    rep.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md/.json/.png")

    bench = sub.add_parser("bench", help="benchmarks on the benchmark model (JSON out)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    over = bench_sub.add_parser("overhead", help="throughput of unwrapped vs steer() vs AblateHeads(10 heads)")
    over.add_argument("--variant", default="full", choices=["full", "small"])
    over.add_argument("--runs", type=int, default=3)
    over.add_argument("--new-tokens", type=int, default=32)
    over.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    batt = bench_sub.add_parser("attention", help="VAR (fast, eager reference), ACT, PAI vs unwrapped sdpa")
    batt.add_argument("--variant", default="full", choices=["full", "small"])
    batt.add_argument("--runs", type=int, default=3)
    batt.add_argument("--decode-steps", type=int, default=64)
    batt.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    bvc = bench_sub.add_parser("vhr-carve", help="seconds per sample: baseline greedy vs VHR vs CARVE")
    bvc.add_argument("--variant", default="full", choices=["full", "small"])
    bvc.add_argument("--runs", type=int, default=3)
    bvc.add_argument("--new-tokens", type=int, default=32)
    bvc.add_argument("--capture-steps", type=int, default=32, help="CARVE's captured steps per prompt")
    bvc.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    bpr = bench_sub.add_parser("pruning", help="FastV and VTC-CLS vs unwrapped: prefill, decode, memory, FLOPs")
    bpr.add_argument("--model", action="append", default=None, help="bench, bench:small, llava15 (default: both full)")
    bpr.add_argument("--runs", type=int, default=3)
    bpr.add_argument("--new-tokens", type=int, default=16)
    bpr.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    bev = bench_sub.add_parser("eval", help="POPE questions/s: the eval runner vs a bare generate loop")
    bev.add_argument("--model", action="append", default=None, help="model specs (default: tiny:llava and bench)")
    bev.add_argument("--batch-size", action="append", type=int, default=None, help="default: 1 and 8")
    bev.add_argument("--questions", type=int, default=16)
    bev.add_argument("--runs", type=int, default=3)
    bev.add_argument("--max-new-tokens", type=int, default=4)
    bev.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    return parser


def _eval_args(p: argparse.ArgumentParser, batch_size: int, max_new_tokens: int) -> None:
    p.add_argument("--images", required=True, help="folder of the images the questions name (e.g. coco/val2014)")
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="a condition to evaluate: none, or method specs joined by + (repeat for several)",
    )
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--out", type=Path, required=True, help="output folder; rerunning with it resumes")
    p.add_argument("--skip-missing", action="store_true", help="leave out items whose image is missing")
    p.add_argument("--no-progress", action="store_true")


def cmd_eval(args: argparse.Namespace) -> dict[str, Any] | None:
    from lvlm_steer.evals.runner import parse_conditions

    conditions = parse_conditions(args.method)  # before the slow model load, so a typo fails fast
    model, processor = _load(args)
    common = dict(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        skip_missing=args.skip_missing,
        progress=not args.no_progress,
    )
    if args.task == "pope":
        from lvlm_steer.evals.pope import DEFAULT_PROMPT_SUFFIX
        from lvlm_steer.evals.pope_eval import evaluate_pope

        suffix = DEFAULT_PROMPT_SUFFIX if args.prompt_suffix is None else args.prompt_suffix
        return evaluate_pope(
            model,
            processor,
            args.model,
            args.questions,
            args.images,
            conditions,
            args.out,
            parser=args.parser,
            prompt_suffix=suffix,
            limit=args.limit,
            **common,
        )
    from lvlm_steer.evals.chair import DEFAULT_CHAIR_PROMPT
    from lvlm_steer.evals.chair_eval import evaluate_chair

    return evaluate_chair(
        model,
        processor,
        args.model,
        args.coco_annotations,
        args.images,
        conditions,
        args.out,
        n_images=args.n_images,
        seed=args.seed,
        prompt=args.prompt or DEFAULT_CHAIR_PROMPT,
        **common,
    )


def cmd_pope_build(args: argparse.Namespace) -> str:
    from lvlm_steer.evals.chair_eval import find_annotations
    from lvlm_steer.evals.pope import build_pope

    instances, _ = find_annotations(args.coco_annotations)
    sets = build_pope(instances, n_images=args.n_images, seed=args.seed, out_dir=args.out)
    return "\n".join(f"{args.out / f'coco_pope_{split}.json'}: {len(qs)} questions" for split, qs in sets.items())


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.bench == "overhead":
        from lvlm_steer.bench.overhead import run_overhead

        return run_overhead(args.variant, args.runs, args.new_tokens, progress=progress)
    if args.bench == "vhr-carve":
        from lvlm_steer.bench.vhr_carve import run_vhr_carve_bench

        return run_vhr_carve_bench(args.variant, args.runs, args.new_tokens, args.capture_steps, progress=progress)
    if args.bench == "attention":
        from lvlm_steer.bench.attention import run_attention_bench

        return run_attention_bench(args.variant, args.runs, args.decode_steps, progress=progress)
    if args.bench == "pruning":
        from lvlm_steer.bench.pruning import DEFAULT_MODELS, run_pruning_bench

        return run_pruning_bench(args.model or DEFAULT_MODELS, args.runs, args.new_tokens, progress=progress)
    from lvlm_steer.bench.eval_overhead import run_eval_bench

    return run_eval_bench(
        args.model or ["tiny:llava", "bench"],
        args.batch_size or [1, 8],
        args.questions,
        args.runs,
        args.max_new_tokens,
        progress=progress,
    )


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    layers: list[int] = []
    for piece in text.split(","):
        lo, dash, hi = piece.partition("-")
        layers += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return layers


def cmd_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    from lvlm_steer.evals.calibrate import calibrate_act

    model, processor = _load(args)
    return calibrate_act(
        model,
        processor,
        args.questions,
        args.images,
        args.out,
        layers=parse_layers(args.layers),
        beta=args.beta,
        threshold=args.threshold,
        limit=args.limit,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def _image_files(path: str, limit: int | None) -> list[Path]:
    target = Path(path)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise SteeringError(f"--images {path!r} is neither an image file nor a folder")
    files = sorted(p for p in target.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
    if not files:
        raise SteeringError(f"no images (.jpg, .png, .webp, .bmp) in {path}")
    return files[:limit] if limit else files


def cmd_heads_scan(args: argparse.Namespace) -> str:
    from PIL import Image

    from lvlm_steer.head_scan import scan_heads

    files = _image_files(args.images, args.limit)
    model, processor = _load(args)
    images = [Image.open(f).convert("RGB") for f in files]
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

    from lvlm_steer.evals.runner import chat_text

    method = ls.AblateHeads(args.heads, mode=args.mode)  # validate the spec before the load
    model, processor = _load(args)
    text = chat_text(processor, args.prompt)
    inputs = dict(processor(images=[[_load_image(args.image)]], text=[text], return_tensors="pt"))
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


def cmd_sinks(args: argparse.Namespace) -> str:
    from lvlm_steer.sinks import find_sink_dims, format_sink_report

    model, processor = _load(args)
    image = _load_image(args.image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(images=[[image]], text=[text], return_tensors="pt"))
    report = find_sink_dims(model, inputs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report.to_json() if hasattr(report, "to_json") else json.dumps(report))
    return format_sink_report(report)


def _load(args: argparse.Namespace):
    """(model, processor) from the shared --model/--device/--dtype/--attn-implementation/--trust-remote-code flags."""
    from lvlm_steer.loading import load_model

    return load_model(args.model, args.device, args.dtype, args.attn_implementation, args.trust_remote_code)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="builtin:testbed",
        help="path or Hub id, builtin:testbed (the shipped testbed, default), builtin:testbed-smollm2, "
        "tiny:<arch> (random), or bench[:small]",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn-implementation", default=None, help="sdpa (default), eager, or flash_attention_2")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    methods = ls.parse_specs(args.method)  # parse before the (slow) load so a typo fails fast
    model, processor = _load(args)
    image = _load_image(args.image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(args.device)

    def run(steered: ls.Steering | None = None) -> str:
        kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        with torch.inference_mode():
            if steered is None:
                out = model.generate(**inputs, **kwargs)
            else:  # a multi-pass method (CARVE) may need the raw image and question
                out = steered.generate(**inputs, images=[image], questions=[args.prompt], **kwargs)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    result: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
    if args.compare or not methods:
        result["none"] = run()
    if methods:
        with ls.steer(model, *methods, processor=processor) as steered:
            result["methods"] = steered.describe()
            result["steered"] = run(steered)
    return result


def _load_image(path: str):
    from PIL import Image

    if path == "random":
        from lvlm_steer.bench.model import benchmark_image

        return benchmark_image(size=224)
    file = Path(path)
    if not file.is_file():
        raise SteeringError(f"image file {path!r} not found (pass --image random for a generated test image)")
    return Image.open(file).convert("RGB")


def cmd_methods() -> str:
    lines = []
    for name in ls.method_names():
        cls = ls.method_class(name)
        lines.append(f"{name}  ({cls.__name__}): {cls.summary}")
        if cls.paper:
            lines.append(f"    source: {cls.paper}")
        params = cls.parameters()
        name_width = max((len(p[0]) for p in params), default=0)
        value_width = max((len(p[1]) for p in params if len(p[1]) <= 16), default=0)
        for pname, default, help_text in params:
            lines.append(f"    {pname:<{name_width}}  default {default:<{value_width}}  {help_text}")
    lines.append("none  no method (the unsteered baseline)")
    return "\n".join(lines)


def cmd_models() -> str:
    rows = [f"{t:<16} {name}" for t, name in sorted(ls.supported_architectures().items())]
    return "model_type       architecture\n" + "\n".join(rows) + "\n\nTest models: --model tiny:<model_type>"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            result = cmd_generate(args)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                for key in ("none", "steered"):
                    if key in result:
                        label = "none" if key == "none" else result["methods"]
                        print(f"[{label}] {result[key]}")
        elif args.command == "eval":
            summary = cmd_eval(args)
            if summary is not None:
                from lvlm_steer.evals.report import build_report, to_markdown

                print(to_markdown(build_report([args.out])))
        elif args.command == "calibrate":
            result = cmd_calibrate(args)
            print(
                f"baseline accuracy {result['baseline_accuracy']:.3f}; heads with a gain: "
                f"{sum(map(len, result['heads'].values()))} -> {args.out} (use act:heads=@{args.out})"
            )
        elif args.command == "heads":
            if args.heads_command == "scan":
                print(cmd_heads_scan(args))
            else:
                r = cmd_heads_ablate(args)
                print(f"[none]    {r['none']}\n[ablated] {r['ablated']}   ({r['heads']})")
                print(
                    f"log p(unablated answer): {r['answer_logprob']:.3f} -> {r['answer_logprob_ablated']:.3f} "
                    f"with the ablation (change {r['delta_logprob']:+.3f})"
                )
        elif args.command == "sinks":
            print(cmd_sinks(args))
        elif args.command == "pope":
            print(cmd_pope_build(args))
        elif args.command == "report":
            from lvlm_steer.evals.report import write_report

            paths = write_report(args.runs, args.out)
            print(paths["markdown"].read_text())
            print("written: " + ", ".join(str(p) for p in paths.values()))
        elif args.command == "demo":
            from lvlm_steer.demo import run_demo

            run_demo(args.out, args.limit, args.method, progress=not args.no_progress, model=args.model)
        elif args.command == "methods":
            print(cmd_methods())
        elif args.command == "models":
            print(cmd_models())
        elif args.command == "bench":
            report = cmd_bench(args)
            text = json.dumps(report, indent=2)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(text + "\n")
            print(text)
    except (SteeringError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every finished record is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
