"""Flags and helpers shared by several commands: the model flags, image loading, argument types."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lvlm_steer.errors import SteeringError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def positive_int(text: str) -> int:
    """argparse type for counts (``--limit``, ``--batch-size``, ...): 0 or a negative number is a typo, not "all"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave the flag out to use everything)")
    return value


def parse_layers(text: str | None) -> list[int] | None:
    """``"2-30"`` or ``"4,5,6"`` -> layer indices (None for no text): the ``--layers`` grammar of ``calibrate``."""
    if not text:
        return None
    layers: list[int] = []
    for piece in text.split(","):
        lo, dash, hi = piece.partition("-")
        layers += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return layers


def add_model_args(p: argparse.ArgumentParser) -> None:
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


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, processor) from the shared --model/--device/--dtype/--attn-implementation/--trust-remote-code flags."""
    from lvlm_steer.loading import load_model

    return load_model(args.model, args.device, args.dtype, args.attn_implementation, args.trust_remote_code)


def load_image(path: str):
    """An RGB image from a file, or the generated test image for ``random``."""
    if path == "random":
        from lvlm_steer.bench.model import benchmark_image

        return benchmark_image(size=224)
    file = Path(path)
    if not file.is_file():
        raise SteeringError(f"image file {path!r} not found (pass --image random for a generated test image)")
    from PIL import Image

    return Image.open(file).convert("RGB")


def image_files(path: str, limit: int | None) -> list[Path]:
    """The image itself, or the images of a folder (sorted, first ``limit``)."""
    target = Path(path)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise SteeringError(f"--images {path!r} is neither an image file nor a folder")
    files = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SteeringError(f"no images (.jpg, .png, .webp, .bmp) in {path}")
    return files[:limit] if limit else files


def chat_inputs(processor: Any, image: Any, prompt: str) -> dict[str, Any]:
    """Processor inputs for one user turn: one image and the prompt, in the model's chat template."""
    from lvlm_steer.evals.runner import chat_text

    return dict(processor(images=[[image]], text=[chat_text(processor, prompt)], return_tensors="pt"))
