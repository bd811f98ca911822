"""ACT, attention calibration ("Unveiling and Harnessing Hidden Attention Sinks", Yu et al., ICML 2024).

In each selected head: score_j = the mean attention that key j receives from the query rows that can see it;
keys with score > `threshold` are sinks, except the first one (normally BOS), which is kept. Sink attention is
multiplied by beta and the freed mass goes to the other keys in proportion to their attention.

KV cache: sinks are found from the prompt's rows at prefill and kept fixed for decode (a new token is never a
sink), so cached decoding edits each new row exactly as a full re-forward with the same sinks would. (The official
code recomputes on whatever rows it sees and breaks under a cache.) Scores need whole attention columns, so the
prompt's probabilities are built for the selected heads only, in chunks of rows; the edit itself uses the grouped
kernel (groups: sink / other) and never builds the (q x k) matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

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
from lvlm_steer.errors import MethodConfigError, SteeringError
from lvlm_steer.heads import HeadMap, format_heads, normalize_heads, parse_heads, validate_heads
from lvlm_steer.method import Host, Method, MethodState
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method

log = logging.getLogger(__name__)
ROW_CHUNK = 256


@register_method
@dataclass
class ACT(Method):
    """Scale down hidden attention sinks (except BOS) in selected heads and redistribute the mass."""

    name: ClassVar[str] = "act"
    summary: ClassVar[str] = "attention calibration: sinks (score > threshold, BOS kept) x beta, mass redistributed"
    paper: ClassVar[str] = "Yu et al., Unveiling and Harnessing Hidden Attention Sinks, ICML 2024"

    heads: HeadMap = field(
        default_factory=dict,
        metadata={
            "parse": parse_heads,
            "format": format_heads,
            "help": "layer.head list (empty: every head of layers 2..L-2, the documented default)",
        },
    )
    beta: float = field(default=0.4, metadata={"help": "kept fraction of sink attention, in [0, 1] (1 = off)"})
    threshold: float = field(default=0.1, metadata={"help": "sink score threshold (mean attention received)"})

    def __post_init__(self) -> None:
        self.heads = normalize_heads(self.heads) if self.heads else {}
        if not 0.0 <= self.beta <= 1.0:
            raise MethodConfigError(f"act: beta must be in [0, 1], got {self.beta}")
        if not 0.0 < self.threshold <= 1.0:
            raise MethodConfigError(f"act: threshold must be in (0, 1], got {self.threshold}")
        self._warned = False  # the default-heads warning is logged once per settings object

    def selected(self, info: ModelInfo) -> HeadMap:
        if self.heads:
            return self.heads
        if not self._warned:
            log.warning(
                "act: no heads given; calibrating every head of layers 2..%d (the default). "
                "`lvlm-steer calibrate act` picks heads on your data.",
                info.num_layers - 2,
            )
            self._warned = True
        return {layer: tuple(range(info.num_heads)) for layer in range(2, info.num_layers - 1)}

    def validate(self, info: ModelInfo) -> None:
        if self.heads:
            validate_heads(self.heads, info, self.name)
        elif info.num_layers < 4:
            raise MethodConfigError(
                f"act: the default layers 2..L-2 are empty for {info.num_layers} layers; give heads"
            )

    def claims(self, info: ModelInfo) -> set:
        return {("attention-head", layer, h) for layer, hs in self.selected(info).items() for h in hs}

    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        return frozenset(self.selected(info)) if self.beta < 1 else frozenset()

    def bind(self, host: Host) -> MethodState:
        return _ACTState(self, host)


class _ACTState(MethodState):
    """Per model: the selected heads as masks, and the sinks found at the last prefill."""

    method: ACT

    def __init__(self, method: ACT, host: Host) -> None:
        super().__init__(method, host)
        self.sinks: dict[int, torch.Tensor] = {}
        self.head_masks: dict[int, torch.Tensor] = {}
        for layer, hs in method.selected(host.info).items():
            mask = torch.zeros(host.info.num_heads, dtype=torch.bool)
            mask[list(hs)] = True
            self.head_masks[layer] = mask

    def reset(self) -> None:
        self.sinks.clear()

    def _find_sinks(self, call: AttentionCall, heads: torch.Tensor) -> torch.Tensor:
        """(B, H, K) sinks of the prompt: mean received attention > threshold, first sink per (row, head) kept."""
        b, h, q_len, _ = call.query.shape
        k_len = call.key.shape[2]
        received = torch.zeros(b, h, k_len, device=call.query.device)
        seen = torch.zeros(b, 1, k_len, device=call.query.device)
        valid_rows = call.context.keys_valid_mask(q_len).to(call.query.device)  # (B, q): padding rows excluded
        for start in range(0, q_len, ROW_CHUNK):
            stop = min(q_len, start + ROW_CHUNK)
            chunk = _slice_rows(call, start, stop)
            mask = rows_mask(chunk, 0) & valid_rows[:, None, start:stop, None]
            probs = masked_softmax(row_logits(chunk, 0), mask)
            received += probs.sum(dim=2)
            seen += mask.float().sum(dim=2)
        score = received / seen.clamp(min=1)
        sinks = (score > self.method.threshold) & heads.to(score.device)[None, :, None]
        first = torch.cumsum(sinks.long(), dim=-1) == 1
        return sinks & ~first

    def _edit_one_row(self, call: AttentionCall, sinks: torch.Tensor) -> torch.Tensor:
        """Decode: the one new row's probabilities are O(keys); edit them directly and multiply by V."""
        probs = masked_softmax(row_logits(call, 0), rows_mask(call, 0))  # (B, H, 1, K)
        edited = _one_row_edit(probs, sinks[:, :, None, :], self.method.beta)
        return attend(edited, call.value).transpose(1, 2).to(call.query.dtype)

    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        from lvlm_steer.kernels import combine_groups, group_masses, grouped_attention

        if softcap(call):
            raise SteeringError("act: attention logit softcapping is not supported by the grouped kernel")
        base = call.base()
        layer, k_len = call.layer_idx, call.key.shape[2]
        heads = self.head_masks[layer]
        if call.context.phase == "prefill":
            self.sinks[layer] = self._find_sinks(call, heads)
        sinks = recorded_key_mask(self.sinks, layer, k_len, call.key.device, self.method.name)
        if call.context.phase != "prefill" and call.query.shape[2] == 1:
            return self._edit_one_row(call, sinks)
        o, lse = grouped_attention(
            call.query, call.key, call.value, sinks.long(), 2, mask=rows_mask(call, 0), scaling=call_scaling(call)
        )
        m = group_masses(lse)
        beta = self.method.beta
        new = torch.stack([m[0] + (1 - beta) * m[1], beta * m[1]])
        rows = combine_groups(o, new)
        untouched = ~(heads.to(rows.device)[None, :, None] & (m[1] > 0))
        return replace_rows(base, 0, rows, keep=untouched)


def _one_row_edit(probs: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """Sink columns x beta, the freed mass spread over the other keys in proportion (rows without sinks unchanged)."""
    freed = (1 - beta) * (probs * sinks).sum(-1, keepdim=True)
    others = torch.where(sinks, torch.zeros_like(probs), probs)
    spread = freed * others / others.sum(-1, keepdim=True).clamp(min=1e-30)
    return torch.where(sinks, beta * probs, probs + spread)


def _slice_rows(call: AttentionCall, start: int, stop: int) -> AttentionCall:
    """The same call restricted to query rows [start, stop) (mask rows sliced to match)."""
    from dataclasses import replace

    q_len = call.query.shape[2]
    mask = call.attention_mask
    if mask is not None and mask.shape[2] == q_len:
        mask = mask[:, :, start:stop]
    elif mask is None:  # pure causal: make the chunk's causal rows explicit
        k_len = call.key.shape[2]
        rows = torch.arange(start, stop, device=call.query.device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=call.query.device)[None, :] <= rows)[None, None]
    return replace(call, query=call.query[:, :, start:stop], attention_mask=mask)
