"""VTC-CLS, "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (Wang et al., 2024).

Visual tokens are pruned before the LLM sees them. In the vision tower, in layers ``start_layer`` up to the
feature layer (the one whose output the LLM receives; LLaVA-1.5 uses the penultimate), the attention of the CLS
query to each patch, averaged over heads, is summed over those layers; the top-``keep`` patch features of each
image stay, in raster order, and the LLM gets only those image tokens. Nothing changes inside the LLM.

Only the CLS row is computed (``q_cls . k^T`` from the attention module's own projections and the inputs it
receives), never the full attention. Towers without a CLS token (SigLIP: Idefics3 / SmolVLM, Gemma 3, PaliGemma)
use instead the mean attention each patch *receives* from all valid queries (a deviation from the paper, which
needs a CLS; computed in bounded blocks of query rows). The adapter maps patch scores to image tokens the way its
connector maps patches (SmolVLM's and InternVL's pixel shuffle: a token's score is the sum over its patches;
Gemma 3's average pool: the mean). ``keep`` applies per vision-tower input: an image for LLaVA, Gemma 3 and
PaliGemma, each crop (and the global image) for Idefics3 / SmolVLM and InternVL. Qwen-VL (fused qkv, rotary,
no CLS), LLaVA-NeXT/OneVision (anyres tiles with newline features) and Mistral 3 are refused with this list.

Shortening the prompt inside ``generate`` would break its bookkeeping (attention mask, cache positions), so the
method owns generation: `Steering.generate` scores and selects, builds the reduced batch (image tokens dropped,
rows re-left-padded, positions re-indexed contiguously as in the paper), feeds the kept features as
pre-encoded ``mm_encoder_outputs`` and calls ``model.generate`` on it; the returned sequences start with the
original prompt. A plain forward with ``pixel_values`` is pruned by a forward pre-hook (its logits cover the
reduced prompt; `VTCCLS.selection` maps them back), and `VTCCLS.prune_inputs` gives the reduced batch itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lvlm_steer.adapters.base import left_pack
from lvlm_steer.compat import cache_from
from lvlm_steer.errors import MethodConfigError, MissingImagesError, SteeringError
from lvlm_steer.method import Method
from lvlm_steer.registry import register_method
from lvlm_steer.stats import LayerTokens

if TYPE_CHECKING:
    from lvlm_steer.adapters.base import VisionScoring
    from lvlm_steer.steering import Steering

PROBE_ELEMENTS = 1 << 23  # cap on (units x heads x query rows x keys) probabilities held at once (no-CLS towers)
SUPPORTED = (
    "llava, internvl (towers with CLS); idefics3, smolvlm, gemma3, paligemma (SigLIP: mean received attention)"
)


def _parse_keep(raw: str) -> float | int:
    value = float(raw)
    return int(value) if "." not in raw and value.is_integer() else value


def _format_keep(value: float | int) -> str:
    return str(value)


@dataclass
class Selection:
    """What the last pruning kept: per unit (image or crop) scores and kept token indices, per row the mask."""

    scores: torch.Tensor  # (units, tokens per unit), higher = more important
    kept: torch.Tensor  # (units, k) indices into each unit's tokens, ascending (raster order)
    keep_mask: torch.Tensor  # (B, L) over the ORIGINAL batch: True where the token goes to the LLM
    unpruned: list[int]  # valid tokens per row before pruning
    pruned: list[int]  # valid tokens per row after pruning


@register_method
@dataclass
class VTCCLS(Method):
    """Keep the top-``keep`` image tokens of each image by the vision tower's CLS attention, before the LLM."""

    name: ClassVar[str] = "vtc_cls"
    summary: ClassVar[str] = "pre-LLM pruning: keep the top-k patches by CLS attention summed over vision layers"
    paper: ClassVar[str] = "Wang et al., [CLS] Token Tells Everything Needed for Training-free Efficient MLLMs, 2024"

    keep: float = field(
        default=128,
        metadata={
            "help": "image tokens kept per image (or crop): a count (64, 128, 256 of 576 in the paper) or a "
            "fraction in (0, 1] written with a dot (0.25)",
            "parse": _parse_keep,
            "format": _format_keep,
        },
    )
    start_layer: int = field(default=16, metadata={"help": "first vision layer whose CLS attention is summed"})

    def __post_init__(self) -> None:
        is_count = type(self.keep) is int
        if (is_count and self.keep < 1) or (not is_count and not 0 < float(self.keep) <= 1):
            raise MethodConfigError(
                f"vtc_cls: keep={self.keep!r} must be a whole token count >= 1 (e.g. keep=64) or a fraction in "
                "(0, 1] written with a dot (e.g. keep=0.25)"
            )
        if not is_count:
            self.keep = float(self.keep)
        if self.start_layer < 0:
            raise MethodConfigError(f"vtc_cls: start_layer must be >= 0, got {self.start_layer}")
        self.selection: Selection | None = None  # what the last pruning kept
        self._scoring: VisionScoring | None = None
        self._issued: Any = None
        self._params: Any = None

    def requires_images(self) -> bool:
        return True

    def tokens_kept(self, per_unit: int) -> int:
        """Kept tokens of a unit that has ``per_unit`` image tokens."""
        if type(self.keep) is int:
            return self.keep
        return max(1, round(float(self.keep) * per_unit))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def attach(self, steering: Steering) -> list[Any]:
        scoring = steering.adapter.vision_scoring()
        name = steering.adapter.display_name or steering.info.architecture
        if scoring is None:
            raise MethodConfigError(
                f"vtc_cls cannot read the vision tower's attention of {name}; supported: {SUPPORTED}. "
                "For pruning inside the LLM, which works on every architecture, use fastv."
            )
        if not 0 <= self.start_layer <= scoring.feature_layer:
            raise MethodConfigError(
                f"vtc_cls: start_layer={self.start_layer} is outside this vision tower's layers "
                f"0..{scoring.feature_layer} (the LLM sees the output of layer {scoring.feature_layer}); "
                "pick start_layer in that range"
            )
        if type(self.keep) is int and self.keep > scoring.tokens_per_unit:
            raise MethodConfigError(
                f"vtc_cls: keep={self.keep} exceeds the {scoring.tokens_per_unit} image tokens of each image (or crop) "
                f"of {name}; use keep <= {scoring.tokens_per_unit}, or a fraction such as keep=0.25"
            )
        self._scoring = scoring
        self._params = inspect.signature(steering.model.forward).parameters
        hook = steering.model.register_forward_pre_hook(
            lambda module, args, kwargs: self._prune_forward(steering, args, kwargs), with_kwargs=True, prepend=True
        )
        return [hook]

    def layer_tokens(self, steering: Steering) -> LayerTokens | None:
        if self.selection is None:
            return None
        sel = self.selection
        return LayerTokens(list(sel.unpruned), [list(sel.pruned) for _ in range(steering.info.num_layers)])

    # -- generation and forward ------------------------------------------------------------------------------
    def generate(self, steering: Steering, **inputs: Any) -> Any:
        """Prune, then ``model.generate`` on the reduced batch; sequences start with the ORIGINAL prompt."""
        reduced = self.prune_inputs(steering, inputs)
        out = steering.model.generate(**reduced)
        sequences = out if torch.is_tensor(out) else out.sequences
        full = torch.cat([inputs["input_ids"].to(sequences.device), sequences[:, reduced["input_ids"].shape[1] :]], 1)
        if torch.is_tensor(out):
            return full
        out.sequences = full
        return out

    def _prune_forward(self, steering: Steering, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if steering.paused:
            return None
        values = dict(zip(self._params, args, strict=False)) | kwargs
        cache = cache_from(values)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # decoding: the prompt was pruned at prefill
        if values.get("pixel_values") is not None:
            return (), self.prune_inputs(steering, values)
        encoded = values.get("mm_encoder_outputs")
        image = encoded.get("image") if hasattr(encoded, "get") else encoded
        if image is not None and image is not self._issued:
            steering.remove()
            raise SteeringError(
                "vtc_cls shortens the prompt, which model.generate cannot follow once it has started; call "
                "generate on the handle instead: `with ls.steer(model, ...) as s: s.generate(**inputs)`. "
                "The steering was removed."
            )
        return None

    # -- pruning -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_inputs(self, steering: Steering, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch the LLM should see: kept image tokens only, re-left-padded, with pre-encoded features.

        Keys of ``inputs`` that are not model inputs (generation settings) pass through unchanged. The
        selection is recorded in `selection` (and feeds `Steering.stats`).
        """
        if self._scoring is None:
            raise RuntimeError("vtc_cls is not attached; use ls.steer(model, ls.VTCCLS(...)) first")
        ids = inputs.get("input_ids")
        if ids is None:
            raise SteeringError("vtc_cls needs input_ids (not inputs_embeds) to find and drop image tokens")
        if inputs.get("pixel_values") is None:
            raise MissingImagesError("vtc_cls prunes image tokens: give the batch images (pixel_values)")
        if inputs.get("position_ids") is not None:
            raise SteeringError("vtc_cls re-indexes positions of the shortened prompt; do not pass position_ids")
        model, adapter = steering.model, steering.adapter
        encoder = model.base_model.get_image_features
        enc_keys = [k for k in inspect.signature(encoder).parameters if k != "kwargs" and k in inputs]
        scores, encoded = self._encode_and_score(encoder, {k: inputs[k] for k in enc_keys})

        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        image = adapter.image_mask(ids) & valid
        features = torch.cat(list(encoded.pooler_output), dim=0)
        per_unit = scores.shape[1]
        if int(image.sum()) != features.shape[0] or features.shape[0] != scores.numel():
            raise SteeringError(
                f"vtc_cls: {int(image.sum())} image tokens, {features.shape[0]} image features and "
                f"{scores.numel()} scored tokens do not line up; this layout needs its own adapter.vision_scoring"
            )
        k = self.tokens_kept(per_unit)
        if k > per_unit:
            raise MethodConfigError(
                f"vtc_cls: keep={self.keep} exceeds the {per_unit} image tokens per image (or crop); "
                f"use keep <= {per_unit} or a fraction"
            )
        kept = scores.topk(k, dim=1).indices.sort(dim=1).values
        unit_keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
        keep = valid.clone()
        keep[image] = unit_keep.flatten().to(keep.device)

        reduced = dict(inputs)
        for key in enc_keys:
            reduced.pop(key, None)
        reduced["input_ids"] = left_pack(ids, keep, adapter.pad_token_id)
        reduced["attention_mask"] = left_pack(torch.ones_like(ids), keep, 0)
        for key in adapter.token_inputs:
            value = inputs.get(key)
            if torch.is_tensor(value) and value.shape == ids.shape:
                reduced[key] = left_pack(value, keep, 0)
        chosen = features[unit_keep.flatten().to(features.device)]
        rows = (image & keep).sum(dim=1).tolist()
        pooled = _pooled([c for c in chosen.split(rows) if c.shape[0]], like=encoded.pooler_output)
        reduced["mm_encoder_outputs"] = {"image": pooled}
        self._issued = reduced["mm_encoder_outputs"]["image"]
        self.selection = Selection(
            scores=scores,
            kept=kept,
            keep_mask=keep,
            unpruned=[int(n) for n in valid.sum(dim=1).tolist()],
            pruned=[int(n) for n in keep.sum(dim=1).tolist()],
        )
        return reduced

    def _encode_and_score(self, encoder, enc_inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """Run the model's own image encoder once with probes on the scored layers: (token scores, output)."""
        scoring = self._scoring
        per_layer: list[torch.Tensor] = []
        probe = cls_row_scores if scoring.cls else received_scores

        def record(module, args, kwargs) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            per_layer.append(probe(module, hidden, mask))

        layers = scoring.attention[self.start_layer : scoring.feature_layer + 1]
        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in layers]
        try:
            encoded = encoder(**enc_inputs, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        if len(per_layer) != len(layers):
            raise SteeringError(
                f"vtc_cls expected {len(layers)} vision attention calls and saw {len(per_layer)}; the vision tower "
                "did not run its layers as the adapter describes"
            )
        return scoring.to_tokens(torch.stack(per_layer).sum(dim=0)), encoded


def _projections(module, hidden: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head queries of ``rows`` and all keys, fp32: (B, H, q, D), (B, H, N, D)."""
    b, n, _ = hidden.shape
    h, d = module.num_heads, module.head_dim
    q_in = hidden[:, rows]
    q, k = module.q_proj(q_in), module.k_proj(hidden)
    if hasattr(module, "q_norm"):  # InternViT normalises the whole projection before splitting heads
        q, k = module.q_norm(q), module.k_norm(k)
    return q.view(b, q_in.shape[1], h, d).transpose(1, 2).float(), k.view(b, n, h, d).transpose(1, 2).float()


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
    if mask is None:
        return logits
    m = mask[:, :, rows] if mask.shape[2] > 1 else mask
    if m.dtype == torch.bool:
        return logits.masked_fill(~m, float("-inf"))
    return logits + m.float()


def cls_row_scores(module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of the CLS query (position 0) to every position, averaged over heads: (B, N)."""
    q, k = _projections(module, hidden, slice(0, 1))
    logits = _apply_mask(q @ k.transpose(-1, -2) * module.scale, mask, slice(0, 1))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def received_scores(module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean attention each position receives from the valid queries, averaged over heads: (B, N).

    For towers without a CLS token. Queries are processed in blocks so the (q x k) probabilities of the
    whole tower are never held at once.
    """
    b, n, _ = hidden.shape
    valid = _valid_keys(mask, b, n, hidden.device)
    total = torch.zeros(b, n, device=hidden.device)
    chunk = max(1, PROBE_ELEMENTS // (b * module.num_heads * n))
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        q, k = _projections(module, hidden, rows)
        probs = _apply_mask(q @ k.transpose(-1, -2) * module.scale, mask, rows).softmax(dim=-1)
        weight = valid[:, None, rows, None].float()  # padded patches ask nothing
        total += (probs * weight).sum(dim=2).mean(dim=1)
    return total / valid.sum(dim=1, keepdim=True).clamp(min=1)


def _valid_keys(mask: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, N) True at positions some query may attend to (real patches)."""
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    m = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    return m.any(dim=1).expand(b, n)



def _pooled(features: list[torch.Tensor], like: Any) -> Any:
    """Kept features as pre-encoded image outputs, in the container the model's own encoder returns.

    Models that take a list (one entry per image or row) get the kept features per row; models that take one
    tensor get them as a single (1, kept, D) block (their forward scatters by element count).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None] if torch.is_tensor(like) else features)
