"""lvlm-steer: inference-time interventions on Hugging Face vision-language models, in one call.

import lvlm_steer as ls
with ls.steer(model, ls.AblateHeads({14: [3, 5]}), processor=proc) as steered:
    out = model.generate(**inputs, max_new_tokens=64)
"""

from lvlm_steer.checkout_path import drop_checkout_root

drop_checkout_root()  # before transformers is imported: the checkout's kernels/ must not pass for the Hub `kernels`

from lvlm_steer.adapters import Adapter, ImageTile, adapter_for, register_adapter, supported_architectures
from lvlm_steer.context import ForwardContext
from lvlm_steer.errors import (
    ConflictError,
    MethodConfigError,
    MethodSpecError,
    MissingImagesError,
    SteeringError,
    UnsupportedModelError,
)
from lvlm_steer.head_scan import HeadScores, scan_heads
from lvlm_steer.hooks import ACT, CARVE, PAI, VAR, VHR, VTCCLS, AblateHeads, FastV, ScaleHeads  # noqa: E402  (registers the methods)
from lvlm_steer.method import Method
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import method_class, method_names, parse_spec, parse_specs, register_method
from lvlm_steer.stats import LayerTokens, PrefillStats, prefill_flops
from lvlm_steer.steering import Steering, steer

__version__ = "0.1.0"

__all__ = [
    "ACT",
    "CARVE",
    "PAI",
    "VAR",
    "VHR",
    "VTCCLS",
    "AblateHeads",
    "FastV",
    "Adapter",
    "ConflictError",
    "ForwardContext",
    "ImageTile",
    "Method",
    "MethodConfigError",
    "MethodSpecError",
    "MissingImagesError",
    "ModelInfo",
    "ScaleHeads",
    "Steering",
    "SteeringError",
    "UnsupportedModelError",
    "adapter_for",
    "method_class",
    "method_names",
    "parse_spec",
    "parse_specs",
    "register_adapter",
    "register_method",
    "scan_heads",
    "HeadScores",
    "LayerTokens",
    "PrefillStats",
    "prefill_flops",
    "steer",
    "supported_architectures",
]
