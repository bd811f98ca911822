"""VAR, visual attention redistribution ("See What You Are Told", Kang et al., ICLR 2025).

1. Sinks: key j is a sink in layer l if max over d in D_sink of |x_j[d] / RMS(x_j)| > tau, with x_j the hidden
   state entering layer l. Detected at prefill and kept for decode (new tokens are never sinks).
2. Image-centric rows, per (head, query row): image attention mass >= `image_mass` and the non-sink share of it
   >= rho.
3. In those rows, the attention of every sink (text sinks such as BOS included) is multiplied by (1 - p), and the
   freed mass goes to the non-sink image tokens in proportion to their attention. Rows: the text rows after the
   image at prefill, every row at decode. Layers 0, 1 and the last layer are left alone.

Parameters follow the paper: p is the fraction MOVED (default 0.4) and rho the non-sink share. The official code
uses 1 - p and 1 - rho (its config's p = 0.6 keeps 60%; confirmed by the author), so p_code = 0.6 is p = 0.4 here.

Fast path: key groups text / text-sink / image / image-sink; the grouped kernel gives each group's normalised
output and log-sum-exp for the edited rows only, and the edit is a change of group masses (no (q x k) matrix).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lvlm_steer.attention import AttentionCall
from lvlm_steer.attention_rows import (
    attend,
    call_scaling,
    masked_softmax,
    recorded_key_mask,
    replace_rows,
    row_logits,
    rows_mask,
    softcap,
)
from lvlm_steer.compat import without_cache
from lvlm_steer.errors import MethodConfigError, SteeringError
from lvlm_steer.layer_sets import format_layer_set, parse_layer_set
from lvlm_steer.method import Host, Method, MethodState
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method

log = logging.getLogger(__name__)

TEXT, TEXT_SINK, IMAGE, IMAGE_SINK = 0, 1, 2, 3


def _parse_dims(text: str) -> tuple[int, ...]:
    return parse_layer_set(text, what="dimension")


@register_method
@dataclass
class VAR(Method):
    """Move a fraction p of sink attention to non-sink image tokens in image-centric heads/rows."""

    name: ClassVar[str] = "var"
    summary: ClassVar[str] = "redistribute sink attention to image tokens in image-centric rows (sink dims per model)"
    paper: ClassVar[str] = "Kang et al., See What You Are Told: Visual Attention Sink in LMMs, ICLR 2025"

    p: float = field(default=0.4, metadata={"help": "fraction of sink attention moved (paper convention)"})
    rho: float = field(default=0.5, metadata={"help": "min non-sink share of image attention (0.5 hallucination)"})
    tau: float = field(default=20.0, metadata={"help": "sink threshold on max |x[d]| / RMS(x) over sink dims"})
    image_mass: float = field(default=0.2, metadata={"help": "min image attention mass of a row"})
    sink_dims: tuple[int, ...] = field(
        default=(),
        metadata={
            "parse": _parse_dims,
            "format": format_layer_set,
            "help": "hidden dims of massive activations (empty: known table, else discovered)",
        },
    )
    start_layer: int = field(default=2, metadata={"help": "first edited layer (paper: 2)"})
    skip_last: bool = field(default=True, metadata={"help": "leave the last layer alone (paper: yes)"})

    def __post_init__(self) -> None:
        for name in ("p", "rho", "image_mass"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise MethodConfigError(f"var: {name} must be in [0, 1], got {value}")
        if self.tau <= 0:
            raise MethodConfigError(f"var: tau must be > 0, got {self.tau}")
        self.sink_dims = tuple(sorted({int(d) for d in self.sink_dims}))

    def layers(self, info: ModelInfo) -> range:
        return range(self.start_layer, info.num_layers - (1 if self.skip_last else 0))

    def validate(self, info: ModelInfo) -> None:
        if not self.layers(info):
            raise MethodConfigError(
                f"var: no layer to edit: start_layer={self.start_layer}, skip_last={self.skip_last} "
                f"on a model with {info.num_layers} text layers"
            )
        bad = [d for d in self.sink_dims if not 0 <= d < info.hidden_size]
        if bad:
            raise MethodConfigError(f"var: sink dims {bad} are outside the hidden size 0..{info.hidden_size - 1}")

    def requires_images(self) -> bool:
        return True

    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        return frozenset(self.layers(info)) if self.p > 0 else frozenset()

    def bind(self, host: Host) -> MethodState:
        return _VARState(self, host)


class _VARState(MethodState):
    """Per model: the sink dimensions in use (given, known or discovered) and the sinks of the last prefill."""

    method: VAR

    def __init__(self, method: VAR, host: Host) -> None:
        super().__init__(method, host)
        self.dims: tuple[int, ...] = method.sink_dims
        self.sinks: dict[int, torch.Tensor] = {}
        if method.p == 0:
            return
        if not self.dims:
            from lvlm_steer.sinks import known_sink_dims

            self.dims = tuple(known_sink_dims(host.model) or ())
        layers = host.adapter.layers()
        for i in method.layers(host.info):
            host.add_forward_pre_hook(layers[i], self._sink_hook(i), with_kwargs=True)

    def prepare(self, forward_kwargs: dict[str, Any]) -> None:
        if self.dims or self.method.p == 0:
            return
        from lvlm_steer.sinks import cached_sink_dims

        inputs = without_cache(forward_kwargs)  # a nested forward must not write into generate's cache
        with self.host.pause():
            report = cached_sink_dims(self.host.model, inputs)
        dims = tuple(getattr(report, "dims", report) or ())
        if not dims:
            raise SteeringError(
                "var: this model has no known sink dimensions and discovery on the first batch found none; run "
                "`lvlm-steer sinks --model ...` to inspect its activations and pass var:sink_dims=D1,D2"
            )
        log.warning("var: discovered sink dimensions %s on the first batch (cached for this model)", dims)
        self.dims = dims

    def reset(self) -> None:
        self.sinks.clear()

    def _sink_hook(self, layer: int):
        from lvlm_steer.sinks import sink_mask

        def hook(module, args, kwargs):
            if self.host.context.phase != "prefill":
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            self.sinks[layer] = sink_mask(hidden, self.dims, self.method.tau)
            return None

        return hook

    def _key_sinks(self, layer: int, key_len: int, device: torch.device) -> torch.Tensor:
        return recorded_key_mask(self.sinks, layer, key_len, device, self.method.name)

    def _edit_one_row(self, call: AttentionCall, image: torch.Tensor) -> torch.Tensor:
        """Decode: one row per sequence, so its probabilities are O(keys); reweight keys by group, then @ V.

        Same math as the group-mass edit (each group scaled uniformly), in one pass and without a base call.
        """
        sinks = self._key_sinks(call.layer_idx, image.shape[1], image.device)[:, None, None, :]
        image = image[:, None, None, :]
        probs = masked_softmax(row_logits(call, 0), rows_mask(call, 0))  # (B, H, 1, K)
        img = (probs * image).sum(-1, keepdim=True)
        image_nonsink = image & ~sinks
        nonsink = (probs * image_nonsink).sum(-1, keepdim=True)
        sink = (probs * sinks).sum(-1, keepdim=True)
        share = torch.where(img > 0, nonsink / img.clamp(min=1e-30), torch.zeros_like(img))
        chosen = (img >= self.method.image_mass) & (share >= self.method.rho)
        boost = 1 + self.method.p * sink / nonsink.clamp(min=1e-30)
        weight = torch.where(sinks, 1 - self.method.p, torch.where(image_nonsink, boost, torch.ones_like(probs)))
        probs = torch.where(chosen, probs * weight, probs)
        return attend(probs, call.value).transpose(1, 2).to(call.query.dtype)

    # -- the edit ----------------------------------------------------------------------------------------
    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        from lvlm_steer.kernels import combine_groups, group_masses, grouped_attention

        if softcap(call):
            raise SteeringError("var: attention logit softcapping is not supported by the grouped kernel")
        ctx = call.context
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        image = ctx.keys_image_mask(k_len).to(call.key.device)
        if ctx.phase != "prefill" and q_len == 1:
            return self._edit_one_row(call, image)
        base = call.base()
        if ctx.phase == "prefill":
            # text rows after each row's last image token (query i sits at key slot k_len - q_len + i)
            last_image = torch.where(image, torch.arange(k_len, device=image.device), -1).max(dim=1).values
            slots = torch.arange(q_len, device=image.device) + (k_len - q_len)
            row_ok = slots[None, :] > last_image[:, None]
            if not row_ok.any():
                return base
            start = int(row_ok.any(dim=0).nonzero()[0])
            row_ok = row_ok[:, start:]
        else:
            start, row_ok = 0, torch.ones(call.query.shape[0], q_len, dtype=torch.bool, device=image.device)
        sinks = self._key_sinks(call.layer_idx, k_len, image.device)
        groups = image.long() * 2 + sinks.long()
        o, lse = grouped_attention(
            call.query[:, :, start:],
            call.key,
            call.value,
            groups,
            4,
            mask=rows_mask(call, start),
            scaling=call_scaling(call),
        )
        m = group_masses(lse)
        img = m[IMAGE] + m[IMAGE_SINK]
        share = torch.where(img > 0, m[IMAGE] / img.clamp(min=1e-30), torch.zeros_like(img))
        chosen = (img >= self.method.image_mass) & (share >= self.method.rho) & row_ok[:, None, :]
        p = self.method.p
        moved = p * (m[TEXT_SINK] + m[IMAGE_SINK])
        new = torch.stack([m[TEXT], (1 - p) * m[TEXT_SINK], m[IMAGE] + moved, (1 - p) * m[IMAGE_SINK]])
        rows = combine_groups(o, new)
        return replace_rows(base, start, rows, keep=~chosen)
