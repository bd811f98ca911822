"""Vision-token reduction before the LLM: the shared base of reducers such as VTC-CLS, VisionZip and PruMerge.

A reducer has one job, `VisionReducer.reduce`: given one batch of vision-tower *units* (an image, or one crop of a
split image), their LLM-space features and, when it asks for them, the tower's attention scores per layer, it says
what the LLM sees of each unit: a subset of its tokens (``kept`` indices, ascending = raster order) or new, merged
tokens (``merged`` features, any count per unit). Everything else is here:
- the encoder runs once (the model's own ``get_image_features``, through the adapter) with row probes on the
  requested tower layers (`lvlm_steer.vision_attention`: the CLS row, or for CLS-less towers the mean attention
  each position receives; the adapter maps positions to image tokens the way its connector does);
- the prompt is shortened: each unit keeps as many image-token slots as it has output tokens (its kept slots, or
  its first slots for merged tokens), rows are re-left-padded and positions re-indexed contiguously (the
  convention of VTC-CLS, VisionZip and PruMerge), and the reduced features go in as pre-encoded
  ``mm_encoder_outputs``;
- `generate` (through `Steering.generate`) reduces, then calls ``model.generate`` on the reduced batch and returns
  sequences that start with the ORIGINAL prompt; a plain forward with pixels is reduced by a forward pre-hook (its
  logits cover the reduced prompt); plain ``model.generate`` is refused with the fix, since it cannot follow a
  prompt shortened after it started.
`Steering.stats` gets the tokens per row before and after (`layer_tokens`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lvlm_steer.adapters import vision_scoring_support
from lvlm_steer.adapters.base import left_pack
from lvlm_steer.compat import cache_from
from lvlm_steer.errors import MethodConfigError, MissingImagesError, SteeringError
from lvlm_steer.method import Method
from lvlm_steer.stats import LayerTokens
from lvlm_steer.vision_attention import cls_row_scores, received_scores

if TYPE_CHECKING:
    from lvlm_steer.adapters.base import VisionScoring
    from lvlm_steer.steering import Steering


@dataclass
class TowerTokens:
    """What a reducer sees: the vision-tower units of one batch, in batch order."""

    features: torch.Tensor  # (units, tokens per unit, D): the LLM-space features of each unit's image tokens
    attention: torch.Tensor | None  # (layers, units, positions) tower attention per requested layer, or None
    layers: range  # the tower layers of ``attention``
    cls: bool  # attention is the CLS row (else: the mean attention each position receives; no CLS token)
    scoring: VisionScoring  # the adapter's tower description (``to_tokens`` maps positions to image tokens)

    @property
    def units(self) -> int:
        return int(self.features.shape[0])

    @property
    def tokens_per_unit(self) -> int:
        return int(self.features.shape[1])

    def token_scores(self, attention: torch.Tensor) -> torch.Tensor:
        """Per-position scores (units, positions) as scores of each unit's image tokens (units, tokens per unit)."""
        return self.scoring.to_tokens(attention)


@dataclass
class Reduction:
    """A reducer's answer: ``kept`` (units, k) ascending token indices, or ``merged`` tokens per unit (k_u, D)."""

    kept: torch.Tensor | None = None
    merged: list[torch.Tensor] | None = None
    scores: torch.Tensor | None = None  # (units, tokens per unit) what the tokens were ranked by, for inspection

    def __post_init__(self) -> None:
        if (self.kept is None) == (self.merged is None):
            raise ValueError("a Reduction gives either kept token indices or merged tokens, not both or neither")


@dataclass
class Selection:
    """What the last reduction did: per unit the scores and kept indices (None for merged tokens), per row counts."""

    scores: torch.Tensor | None  # (units, tokens per unit), higher = more important
    kept: torch.Tensor | None  # (units, k) indices into each unit's tokens, ascending (raster order)
    keep_mask: torch.Tensor  # (B, L) over the ORIGINAL batch: True where a slot goes to the LLM
    unpruned: list[int]  # valid tokens per row before reduction
    pruned: list[int]  # valid tokens per row after reduction


class VisionReducer(Method):
    """Base of pre-LLM vision-token reducers; subclasses are method dataclasses that implement `reduce`.

    Subclasses call ``super().__post_init__()`` (or `_init_reducer`) from their own ``__post_init__``, and may
    override `tower_layers` (which tower layers' attention to probe; default none) and `check_tower`.
    """

    def _init_reducer(self) -> None:
        self.selection: Selection | None = None  # what the last reduction kept
        self._scoring: VisionScoring | None = None
        self._issued: Any = None
        self._params: Any = None

    def __post_init__(self) -> None:
        self._init_reducer()

    # -- what a reducer implements ----------------------------------------------------------------------------
    def reduce(self, tokens: TowerTokens) -> Reduction:
        """Map the units' tokens (and tower attention) to what the LLM sees of each unit."""
        raise NotImplementedError(f"{type(self).__name__} must implement reduce(tokens)")

    def tower_layers(self, scoring: VisionScoring) -> range | None:
        """The tower layers whose attention `reduce` needs (probed during the one encoder pass); None: none."""
        return None

    def check_tower(self, scoring: VisionScoring, name: str) -> None:
        """Raise `MethodConfigError` if a setting does not fit this tower (checked at attach)."""

    def requires_images(self) -> bool:
        return True

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def attach(self, steering: Steering) -> list[Any]:
        scoring = steering.adapter.vision_scoring()
        name = steering.adapter.display_name or steering.info.architecture
        if scoring is None:
            raise MethodConfigError(
                f"{self.name} cannot read the vision tower's attention of {name}; supported: "
                f"{vision_scoring_support()}. For pruning inside the LLM, which works on every architecture, use fastv."
            )
        self.check_tower(scoring, name)
        self._scoring = scoring
        self._params = inspect.signature(steering.model.forward).parameters
        hook = steering.model.register_forward_pre_hook(
            lambda module, args, kwargs: self._reduce_forward(steering, args, kwargs), with_kwargs=True, prepend=True
        )
        return [hook]

    def layer_tokens(self, steering: Steering) -> LayerTokens | None:
        if self.selection is None:
            return None
        sel = self.selection
        return LayerTokens(list(sel.unpruned), [list(sel.pruned) for _ in range(steering.info.num_layers)])

    # -- generation and forward ---------------------------------------------------------------------------------
    def generate(self, steering: Steering, **inputs: Any) -> Any:
        """Reduce, then ``model.generate`` on the reduced batch; sequences start with the ORIGINAL prompt."""
        reduced = self.reduce_inputs(steering, inputs)
        out = steering.model.generate(**reduced)
        sequences = out if torch.is_tensor(out) else out.sequences
        full = torch.cat([inputs["input_ids"].to(sequences.device), sequences[:, reduced["input_ids"].shape[1] :]], 1)
        if torch.is_tensor(out):
            return full
        out.sequences = full
        return out

    def _reduce_forward(self, steering: Steering, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if steering.paused:
            return None
        values = dict(zip(self._params, args, strict=False)) | kwargs
        cache = cache_from(values)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # decoding: the prompt was reduced at prefill
        if values.get("pixel_values") is not None:
            return (), self.reduce_inputs(steering, values)
        encoded = values.get("mm_encoder_outputs")
        image = encoded.get("image") if hasattr(encoded, "get") else encoded
        if image is not None and image is not self._issued:
            steering.remove()
            raise SteeringError(
                f"{self.name} shortens the prompt, which plain model.generate cannot follow once it has started: "
                "call steered.generate(**inputs, ...) on the handle that steer() returned "
                "(`with ls.steer(model, ...) as steered: steered.generate(**inputs)`). The steering was removed."
            )
        return None

    # -- reduction ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_inputs(self, steering: Steering, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch the LLM should see: the reduced image tokens only, re-left-padded, with pre-encoded features.

        Keys of ``inputs`` that are not vision inputs (generation settings) pass through unchanged. The result
        is recorded in `selection` (and feeds `Steering.stats`).
        """
        if self._scoring is None:
            raise RuntimeError(f"{self.name} is not attached; use ls.steer(model, method) first")
        ids = inputs.get("input_ids")
        if ids is None:
            raise SteeringError(f"{self.name} needs input_ids (not inputs_embeds) to find and drop image tokens")
        if inputs.get("pixel_values") is None:
            raise MissingImagesError(f"{self.name} reduces image tokens: give the batch images (pixel_values)")
        if inputs.get("position_ids") is not None:
            raise SteeringError(f"{self.name} re-indexes positions of the shortened prompt; do not pass position_ids")
        adapter = steering.adapter
        attention, encoded = self._encode(adapter, inputs)

        mask = inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        image = adapter.image_mask(ids) & valid
        features = torch.cat(list(encoded.pooler_output), dim=0)
        per_unit = self._scoring.tokens_per_unit
        units = features.shape[0] // per_unit if per_unit else 0
        if int(image.sum()) != features.shape[0] or units * per_unit != features.shape[0]:
            raise SteeringError(
                f"{self.name}: {int(image.sum())} image tokens, {features.shape[0]} image features and {per_unit} "
                "tokens per image (or crop) do not line up; this layout needs its own adapter.vision_scoring"
            )
        layers = self.tower_layers(self._scoring) or range(0)
        tokens = TowerTokens(features.view(units, per_unit, -1), attention, layers, self._scoring.cls, self._scoring)
        reduction = self.reduce(tokens)
        unit_keep, chosen = self._slots_and_features(reduction, tokens, features)
        keep = valid.clone()
        keep[image] = unit_keep.flatten().to(keep.device)

        reduced = adapter.without_vision_inputs(inputs)
        reduced["input_ids"] = left_pack(ids, keep, adapter.pad_token_id)
        reduced["attention_mask"] = left_pack(torch.ones_like(ids), keep, 0)
        for key in adapter.token_inputs:
            value = inputs.get(key)
            if torch.is_tensor(value) and value.shape == ids.shape:
                reduced[key] = left_pack(value, keep, 0)
        rows = (image & keep).sum(dim=1).tolist()
        pooled = _pooled([c for c in chosen.split(rows) if c.shape[0]], like=encoded.pooler_output)
        reduced["mm_encoder_outputs"] = {"image": pooled}
        self._issued = reduced["mm_encoder_outputs"]["image"]
        self.selection = Selection(
            scores=reduction.scores,
            kept=reduction.kept,
            keep_mask=keep,
            unpruned=[int(n) for n in valid.sum(dim=1).tolist()],
            pruned=[int(n) for n in keep.sum(dim=1).tolist()],
        )
        return reduced

    def _slots_and_features(
        self, reduction: Reduction, tokens: TowerTokens, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(units, tokens per unit) slots kept in the prompt, and the features that fill them, in batch order."""
        units, per_unit = tokens.units, tokens.tokens_per_unit
        if reduction.kept is not None:
            kept = reduction.kept
            if kept.shape[0] != units or (kept.numel() and int(kept.max()) >= per_unit):
                raise SteeringError(f"{self.name}: kept indices {tuple(kept.shape)} do not fit {units} x {per_unit}")
            unit_keep = torch.zeros(units, per_unit, dtype=torch.bool, device=kept.device).scatter_(1, kept, True)
            return unit_keep, features[unit_keep.flatten().to(features.device)]
        merged = reduction.merged
        if len(merged) != units:
            raise SteeringError(f"{self.name}: merged tokens for {len(merged)} units, the batch has {units}")
        counts = torch.tensor([m.shape[0] for m in merged])
        if (counts < 1).any() or (counts > per_unit).any():
            raise SteeringError(f"{self.name}: each unit must give 1..{per_unit} merged tokens, got {counts.tolist()}")
        unit_keep = torch.arange(per_unit)[None, :] < counts[:, None]  # merged tokens take a unit's first slots
        return unit_keep, torch.cat([m.to(features.dtype) for m in merged])

    def _encode(self, adapter, inputs: dict[str, Any]) -> tuple[torch.Tensor | None, Any]:
        """Run the model's own image encoder once, probing the requested tower layers: (attention, output)."""
        scoring = self._scoring
        layers = self.tower_layers(scoring)
        if not layers:
            return None, adapter.encode_images(inputs)
        per_layer: list[torch.Tensor] = []
        probe = cls_row_scores if scoring.cls else received_scores

        def record(module, args, kwargs) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            per_layer.append(probe(module, hidden, mask, scoring.project))

        modules = [scoring.attention[i] for i in layers]
        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
        try:
            encoded = adapter.encode_images(inputs)
        finally:
            for h in handles:
                h.remove()
        if len(per_layer) != len(modules):
            raise SteeringError(
                f"{self.name} expected {len(modules)} vision attention calls and saw {len(per_layer)}; the vision "
                "tower did not run its layers as the adapter describes"
            )
        return torch.stack(per_layer), encoded


def _pooled(features: list[torch.Tensor], like: Any) -> Any:
    """Reduced features as pre-encoded image outputs, in the container the model's own encoder returns.

    Models that take a list (one entry per image or row) get the features per row; models that take one
    tensor get them as a single (1, kept, D) block (their forward scatters by element count).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None] if torch.is_tensor(like) else features)
