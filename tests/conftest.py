"""Shared fixtures: tiny models of every architecture (built once per session), batches, reference data."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

# `python -m pytest` puts the checkout's root on sys.path, where kernels/, hooks/ and evals/ (installed as
# lvlm_steer.*) would pass for top-level packages: kernels/ would shadow the Hugging Face `kernels` package that
# transformers >= 5.25 imports. The tests use the installed package, as a user does.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from lvlm_steer.testing import ARCHITECTURES, chat_prompt, make_image, tiny_batch, tiny_model  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

# per-architecture image sizes for the two batch rows: different where the processor keeps the size
IMAGE_SIZES = ((64, 48), (40, 56))
PROMPTS = ("What is in the image?", "Describe the colours and the shapes you can see here, please.")


@functools.cache
def _model(arch: str):
    return tiny_model(arch, seed=0)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model_and_processor(arch):
    model, processor = _model(arch)
    return model, processor


def batch(processor, rows: tuple[int, ...] = (0, 1)):
    """A left-padded batch of the chosen rows of (PROMPTS, IMAGE_SIZES); rows differ in prompt length and image."""
    prompts = [chat_prompt(processor, PROMPTS[r]) for r in rows]
    images = [make_image(seed=r, size=IMAGE_SIZES[r]) for r in rows]
    return dict(tiny_batch(processor, prompts, images))


def greedy_with_logits(model, inputs, steps: int = 4, suppress: list[int] | None = None):
    """Greedy generate of exactly ``steps`` tokens: (sequences, per-step logits (B, steps, V))."""
    suppress = suppress if suppress is not None else [model.config.image_token_id]
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        suppress_tokens=suppress,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def require_reference(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it lives in ../shared beside the checkout)")
    return path


def our_hooks(model) -> dict[str, int]:
    """Counts of torch hooks on every module (anything we leave behind shows up here)."""
    counts = {}
    for name, module in model.named_modules():
        n = len(module._forward_pre_hooks) + len(module._forward_hooks)
        if n:
            counts[name] = n
    return counts
