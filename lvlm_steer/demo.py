"""``lvlm-steer demo``: every method against ``none`` on a built-in testbed, offline, in minutes.

``--model builtin:testbed`` (default) is the 1.4M-parameter testbed; ``--model builtin:testbed-smollm2`` the one whose
language model is the real SmolLM2-135M-Instruct (attention sinks and massive activations are real there).

Held-out testbed scenes are generated deterministically into ``<out>/data`` (COCO-format annotations, so the
project's own POPE builder and CHAIR scorer run on them unchanged); then POPE random / popular / adversarial and
CHAIR are evaluated for ``none`` and each method with a sensible default spec, and the side-by-side report
(Markdown, JSON, bar chart with 95% intervals) is written to ``<out>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lvlm_steer as ls

# Default specs for the testbed (4 text layers, 3 vision layers, 64 image tokens); a method not listed runs with its
# own defaults. "{heads}" is filled with the top VHD heads of a quick head scan.
# The papers' layer defaults (start at layer 2, skip the last, layers 2..L-2) leave one layer or none to edit in so
# shallow a model, so layer-bound methods start at layer 1 here.
DEFAULT_SPECS: dict[str, str] = {
    "ablate": "ablate:heads={heads}",
    "act": "act:heads=1.0,1.1,1.2,1.3",
    "pai": "pai:start_layer=1",
    "scale": "scale:heads={heads},gain=2",
    "var": "var:start_layer=1",
    "vtc_cls": "vtc_cls:keep=0.5,start_layer=1",
}
# The SmolLM2 testbed has 30 text layers, so the papers' layer defaults apply; its tower is the first testbed's
# 3-layer CLIP, so VTC-CLS still starts at tower layer 1.
SMOLLM2_SPECS: dict[str, str] = {
    "ablate": "ablate:heads={heads}",
    "scale": "scale:heads={heads},gain=2",
    "vtc_cls": "vtc_cls:keep=0.5,start_layer=1",
}
POPE_IMAGES = 150  # -> 900 questions per split
CHAIR_IMAGES = 400
# Per built-in model: (method specs, POPE images, CHAIR images) at the demo's default size. The SmolLM2 testbed
# costs ~100x more per token, so its default run is smaller (wider intervals).
MODELS: dict[str, tuple[dict[str, str], int, int]] = {
    "builtin:testbed": (DEFAULT_SPECS, POPE_IMAGES, CHAIR_IMAGES),
    "builtin:testbed-smollm2": (SMOLLM2_SPECS, 50, 100),
}


def scan_top_heads(model, processor, images: list[Any], k: int = 2) -> str:
    """The ``k`` heads with the largest vision-aware head divergence, as a ``layer.head`` list."""
    scores = ls.scan_heads(model, processor, images, "Please describe this image in detail.")
    return ",".join(f"{layer}.{head}" for layer, head, _ in scores.top(k, by="vhd"))


def method_specs(
    model, processor, image, heads: Callable[[], str], say: Callable[[str], None],
    defaults: dict[str, str] | None = None,
) -> list[str]:  # fmt: skip
    """One working spec per registered method; a method that does not run on the testbed is skipped with a reason."""
    import torch

    from lvlm_steer.evals.runner import chat_text

    question = "Is there a cup in the image? Answer the question using a single word or phrase."
    inputs = dict(processor(images=[[image]], text=[chat_text(processor, question)], return_tensors="pt"))
    raw = {"images": [image], "questions": [question]}  # for methods that rebuild their own prompts (CARVE)
    specs = []
    for name in ls.method_names():
        spec = (DEFAULT_SPECS if defaults is None else defaults).get(name, name)
        try:
            if "{heads}" in spec:
                spec = spec.format(heads=heads())
            methods = ls.parse_specs([spec])
            with torch.inference_mode(), ls.steer(model, *methods, processor=processor) as steered:
                steered.generate(**inputs, **raw, max_new_tokens=2, do_sample=False)
        except Exception as exc:  # noqa: BLE001 - any failure means: skip this method, say why
            say(f"skipping {name}: {type(exc).__name__}: {exc}")
            continue
        specs.append(spec)
    return specs


def prepare_data(root: Path, pope_images: int, chair_images: int, seed: int = 7) -> dict[str, Any]:
    """Held-out scenes + POPE question files under ``root`` (reused when already there)."""
    from lvlm_steer.evals.pope import build_pope
    from lvlm_steer.testbed.world import write_coco

    n_scenes = max(4 * pope_images, chair_images, 200)  # about half the scenes hold the 3 objects POPE needs
    marker = root / f"ready-{n_scenes}-{pope_images}-{seed}"
    ann = root / "annotations"
    if not marker.is_file():
        write_coco(root, n_scenes, seed=seed)
        build_pope(ann / "instances_val2014.json", n_images=pope_images, seed=seed, out_dir=root / "pope")
        marker.write_text("ok\n")
    splits = ("random", "popular", "adversarial")
    return {
        "images": root / "val2014",
        "annotations": ann,
        "questions": [root / "pope" / f"coco_pope_{s}.json" for s in splits],
    }


def run_demo(
    out: str | Path = "lvlm-steer-demo", limit: int | None = None, methods: list[str] | None = None,
    batch_size: int = 32, progress: bool = True, say: Callable[[str], None] = print, model: str = "builtin:testbed",
) -> dict[str, Path]:  # fmt: skip
    """Evaluate ``none`` + every method (or ``methods``) on a built-in testbed (``model``); write and return the
    report paths."""
    from PIL import Image

    from lvlm_steer.errors import SteeringError
    from lvlm_steer.evals.chair_eval import evaluate_chair
    from lvlm_steer.evals.pope_eval import evaluate_pope
    from lvlm_steer.evals.report import write_report
    from lvlm_steer.evals.runner import parse_conditions
    from lvlm_steer.loading import load_model

    started = time.time()
    if model not in MODELS:
        raise SteeringError(f"the demo runs on a built-in testbed; choose --model {' or '.join(MODELS)}")
    defaults, default_pope, default_chair = MODELS[model]
    if methods is not None:
        parse_conditions(["none", *methods])  # a typo fails before any work
    out = Path(out)
    pope_images = default_pope if limit is None else max(1, -(-limit // 6))
    chair_images = default_chair if limit is None else limit
    say(f"[demo] preparing held-out testbed data in {out / 'data'}")
    data = prepare_data(out / "data", pope_images, chair_images)
    spec = model
    say(f"[demo] loading {spec}")
    model, processor = load_model(spec)
    sample_files = sorted(data["images"].iterdir())[:8]
    samples = [Image.open(p).convert("RGB") for p in sample_files]
    cache: dict[str, str] = {}

    def heads() -> str:
        if "heads" not in cache:
            cache["heads"] = scan_top_heads(model, processor, samples)
            say(f"[demo] top VHD heads from a {len(samples)}-image scan: {cache['heads']}")
        return cache["heads"]

    specs = methods if methods is not None else method_specs(model, processor, samples[0], heads, say, defaults)
    conditions = parse_conditions(["none", *specs])
    say(f"[demo] conditions: {', '.join(c.label for c in conditions)}")
    tag = ("full" if limit is None else f"limit{limit}") + spec.removeprefix("builtin:testbed")
    pope_dir, chair_dir = out / "runs" / f"pope-{tag}", out / "runs" / f"chair-{tag}"
    say(f"[demo] POPE: {len(data['questions'])} splits x {limit or 6 * pope_images} questions per condition")
    evaluate_pope(
        model, processor, spec, data["questions"], data["images"], conditions, pope_dir,
        batch_size=batch_size, limit=limit, max_new_tokens=8, progress=progress,
    )  # fmt: skip
    say(f"[demo] CHAIR: {chair_images} captions per condition")
    evaluate_chair(
        model, processor, spec, data["annotations"], data["images"], conditions, chair_dir,
        n_images=chair_images, batch_size=batch_size, max_new_tokens=40, progress=progress,
    )  # fmt: skip
    paths = write_report([pope_dir, chair_dir], out)
    say(paths["markdown"].read_text())
    say(f"[demo] done in {time.time() - started:.0f}s; written: " + ", ".join(str(p) for p in paths.values()))
    return paths
