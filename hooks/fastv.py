"""FastV: drop the least-attended image tokens after layer K ("An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Layers 0..K-1 run on the full prompt. At layer K-1 the attention probabilities of the last query row (the
official code; ``score="mean"``: the mean attention each key receives from all valid query rows, the paper's
text), averaged over heads, rank each row's V image tokens; the top ``round(V * (1 - R))`` (half up) stay,
with every valid non-image token and the last token. Layers K..L-1 run on the kept tokens only.

K = 0: no layer ran before the cut, so there is no attention to rank by; the kept image tokens are then
evenly spaced (image token j of V stays iff floor((j+1)n/V) > floor(jn/V), n = number kept), a deterministic
stand-in for the paper's random choice at K = 0.

Mechanism (no model code touched): an attention probe on layer K-1 (one query row, or row chunks for
"mean"), and forward pre-hooks on layers K..L-1 that gather hidden states (at layer K), the precomputed
rotary cos/sin, ``position_ids`` and the attention mask with the kept indices, so kept tokens keep their
ORIGINAL positions (Qwen2-VL's mrope included). Rows of a batch keep different numbers of tokens; the kept
sets are left-padded to a common length with masked key slots (left padding of the prompt is dropped). The
caches of layers >= K hold only kept tokens (plus generated ones); at decode the pre-hooks build each pruned
layer's mask from the kept slots, because transformers sizes the decode mask from layer 0's cache (full length
for K > 0, pruned for K = 0). So ``get_seq_length()`` is the full prompt length for K > 0 and the pruned one for
K = 0; decode positions come from generate's position counter either way, so kept tokens and new ones keep
their original positions. Without a cache (``use_cache=False``) every forward is a prefill and re-selects.

What the caller gets: logits for the kept positions only, shape (B, L', V), in order (the last position is
always kept, which is all ``generate`` reads); `FastV.kept_positions` maps them back to prompt slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lvlm_steer.attention import AttentionCall
from lvlm_steer.attention_rows import masked_softmax, row_logits
from lvlm_steer.errors import MethodConfigError, SteeringError
from lvlm_steer.masks import additive_mask, allowed_keys
from lvlm_steer.method import Host, Method, MethodState
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import register_method
from lvlm_steer.stats import LayerTokens

SCORES = ("last", "mean")
_PROBE_ELEMENTS = 1 << 24  # cap on (B x H x rows x keys) probabilities held at once for score="mean"


@register_method
@dataclass
class FastV(Method):
    """Keep the top (1 - r) of each row's image tokens, ranked by layer k-1's attention, for layers k and up."""

    name: ClassVar[str] = "fastv"
    summary: ClassVar[str] = "prune the least-attended image tokens after layer k (original positions kept)"
    paper: ClassVar[str] = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024"

    k: int = field(default=2, metadata={"help": "first layer that runs on the kept tokens (0: evenly spaced)"})
    r: float = field(default=0.5, metadata={"help": "fraction of image tokens dropped, in [0, 1)"})
    score: str = field(default="last", metadata={"help": "rank by the last query row (code) or mean of rows (paper)"})

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise MethodConfigError(f"fastv: k must be an integer layer index >= 0, got {self.k!r}")
        if not 0.0 <= float(self.r) < 1.0:
            raise MethodConfigError(f"fastv: r (fraction of image tokens dropped) must be in [0, 1), got {self.r}")
        if self.score not in SCORES:
            raise MethodConfigError(f"fastv: score must be one of {', '.join(SCORES)}, got {self.score!r}")

    # -- method interface ---------------------------------------------------------------------------------
    def validate(self, info: ModelInfo) -> None:
        if not info.full_attention_only:
            kinds = sorted(set(info.layer_types) - {"full_attention"})
            raise MethodConfigError(
                f"fastv: this model has {', '.join(kinds)} layers; FastV supports "
                "full-attention text models only (a sliding-window cache cannot hold a pruned sequence)"
            )
        if self.k >= info.num_layers:
            raise MethodConfigError(
                f"fastv: k must be in [0, {info.num_layers}) for this model ({info.num_layers} text layers), "
                f"got {self.k}"
            )

    def requires_images(self) -> bool:
        return True

    @property
    def active(self) -> bool:
        return self.r > 0

    def attention_layers(self, info: ModelInfo) -> frozenset[int]:
        return frozenset({self.k - 1}) if self.active and self.k > 0 else frozenset()

    def claims(self, info: ModelInfo) -> set:
        # layers >= k see a different key layout: attention edits there would read the wrong slots
        return {("attention", layer) for layer in range(self.k, info.num_layers)} if self.active else set()

    def bind(self, host: Host) -> MethodState:
        return _FastVState(self, host)


class _FastVState(MethodState):
    """Per model: layer k-1's scores, the kept slots of the last prefill, and the pruned layers' hooks."""

    method: FastV

    def __init__(self, method: FastV, host: Host) -> None:
        super().__init__(method, host)
        self.k = method.k
        self._window = host.info.sliding_window  # a window the whole sequence must fit in
        self.reset()
        if not method.active:
            return
        layers = host.adapter.layers()
        for i in range(self.k, len(layers)):
            host.add_forward_pre_hook(layers[i], self._layer_hook(i), with_kwargs=True)

    def reset(self) -> None:
        self._scores: torch.Tensor | None = None  # (B, L) key scores from layer k-1
        self._idx: torch.Tensor | None = None  # (B, L') kept prompt slots, ascending, left-padded
        self._slot_valid: torch.Tensor | None = None  # (B, L') False at padding slots
        self._full_len = 0
        self._decoded = 0  # tokens appended to the pruned caches since the prefill
        self._valid_counts: list[int] | None = None
        self._kept_counts: list[int] | None = None
        self._memo: dict[int, tuple[Any, Any]] = {}

    def layer_tokens(self) -> LayerTokens | None:
        if self._valid_counts is None or self._kept_counts is None:
            return None
        n = self.host.info.num_layers
        return LayerTokens(
            list(self._valid_counts), [list(self._valid_counts)] * self.k + [list(self._kept_counts)] * (n - self.k)
        )

    @property
    def kept_positions(self) -> torch.Tensor | None:
        """(B, L') prompt slot of each output position of the last prefill (-1 at padding slots)."""
        if self._idx is None:
            return None
        return self._idx.masked_fill(~self._slot_valid, -1)

    # -- scoring (layer k-1) ----------------------------------------------------------------------------------
    def edit_attention(self, call: AttentionCall) -> torch.Tensor:
        out = call.base()
        if call.context.phase == "prefill":
            self._scores = self._probe(call)
        return out

    def _probe(self, call: AttentionCall) -> torch.Tensor:
        """(B, K) head-mean attention each key gets: from the last query row, or averaged over valid rows."""
        q_len = call.query.shape[2]
        if self.method.score == "last":
            return _row_probs(call, q_len - 1, q_len)[:, 0]
        b, h, _, _ = call.query.shape
        k_len = call.key.shape[2]
        valid = call.context.query_valid_mask().to(call.query.device).float()  # (B, q)
        chunk = max(1, _PROBE_ELEMENTS // max(1, b * h * k_len))
        total = torch.zeros(b, k_len, device=call.query.device)
        for s in range(0, q_len, chunk):
            e = min(q_len, s + chunk)
            total += (_row_probs(call, s, e) * valid[:, s:e, None]).sum(dim=1)
        return total / valid.sum(dim=1, keepdim=True).clamp(min=1)

    # -- selection -------------------------------------------------------------------------------------------
    def _select(self, device: torch.device) -> None:
        """Fix this prefill's kept slots: per row all valid non-image tokens, the top image tokens, the last token."""
        ctx = self.host.context
        valid = ctx.keys_valid_mask().to(device)
        image = ctx.keys_image_mask().to(device) & valid
        n_image = image.sum(dim=1)
        n_keep = torch.floor(n_image.double() * (1.0 - float(self.method.r)) + 0.5).long()
        if self.k == 0:
            order = torch.cumsum(image.long(), dim=1) - 1  # index of each image token within its row
            per = n_image.clamp(min=1)[:, None]
            chosen = image & ((order + 1) * n_keep[:, None] // per > order * n_keep[:, None] // per)
        else:
            if self._scores is None:
                raise SteeringError(f"fastv: layer {self.k - 1} was not probed in this prefill; run it steered")
            scores = self._scores.to(device).float().masked_fill(~image, float("-inf"))
            ranked = scores.argsort(dim=1, descending=True, stable=True)
            positions = torch.arange(ranked.shape[1], device=device).expand_as(ranked)
            rank = torch.empty_like(ranked).scatter_(1, ranked, positions)
            chosen = image & (rank < n_keep[:, None])
        keep = (valid & ~image) | chosen
        keep[:, -1] = True  # generate reads the last position (always valid with left padding)
        counts = keep.sum(dim=1)
        width = int(counts.max())
        idx = keep.to(torch.int8).argsort(dim=1, stable=True)[:, keep.shape[1] - width :]
        self._idx, self._slot_valid = idx, keep.gather(1, idx)
        self._full_len = keep.shape[1]
        self._valid_counts = valid.sum(dim=1).tolist()
        self._kept_counts = counts.tolist()
        self._scores = None

    # -- pruned layers -----------------------------------------------------------------------------------------
    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            prefill = self.host.context.phase == "prefill"
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer == self.k:
                self._memo = {}
                if prefill:
                    self._select(hidden.device)
                    self._decoded = 0
                else:
                    self._decoded += hidden.shape[1]
                if self._window is not None and self._full_len + self._decoded > self._window:
                    raise SteeringError(
                        f"fastv: {self._full_len + self._decoded} tokens exceed this model's sliding window "
                        f"({self._window}); a pruned cache cannot be windowed: use shorter prompts or generations"
                    )
            if self._idx is None:
                raise SteeringError("fastv: no prefill ran under this steering; start with a full prompt")
            kwargs = dict(kwargs)
            if prefill:
                if hidden.shape[1] == self._full_len:
                    hidden = _take_rows(hidden, self._idx)
                if kwargs.get("position_embeddings") is None:
                    raise SteeringError(
                        "fastv: the decoder layers got no position_embeddings, so kept tokens cannot keep their "
                        "positions; this architecture is not supported"
                    )
                kwargs["position_embeddings"] = self._memoized(kwargs["position_embeddings"], self._take_embeddings)
                if isinstance(kwargs.get("position_ids"), torch.Tensor):
                    kwargs["position_ids"] = self._memoized(kwargs["position_ids"], self._take_positions)
            q_len = hidden.shape[1]
            kwargs["attention_mask"] = self._memoized(
                kwargs.get("attention_mask"), lambda m: self._layer_mask(m, q_len, prefill)
            )
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _memoized(self, value: Any, make) -> Any:
        """Slice each per-forward input once (all pruned layers get the same objects from the text model)."""
        hit = self._memo.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        out = make(value)
        self._memo[id(value)] = (value, out)
        return out

    def _take_embeddings(self, pair):
        return tuple(_take_rows(t, self._idx) for t in pair)

    def _take_positions(self, pos: torch.Tensor) -> torch.Tensor:
        if pos.shape[-1] != self._full_len:
            return pos
        if pos.dim() == 3:  # (3, B, L) mrope
            return torch.stack([_take_rows(p[..., None], self._idx)[..., 0] for p in pos])
        return _take_rows(pos[..., None], self._idx)[..., 0]

    def _layer_mask(self, mask: torch.Tensor | None, q_len: int, prefill: bool) -> torch.Tensor | None:
        """The attention mask of a pruned layer (same format as the one transformers built for the full layout).

        Prefill: transformers' mask gathered at the kept slots (rows and columns), padding slots hidden. Decode:
        built from the kept slots plus the tokens generated since (transformers sizes its decode mask from the
        cache of layer 0, which is full length for k > 0 and pruned for k = 0, so it cannot be reused as is).
        """
        idx, slot_valid = self._idx, self._slot_valid
        b, width, device = idx.shape[0], idx.shape[1], idx.device
        if prefill:
            allowed = None if mask is None or mask.dim() != 4 else _gather_square(mask, idx)
            if mask is not None and mask.dim() == 2:  # flash attention's (B, keys) padding mask
                return slot_valid.to(mask.dtype)
            if allowed is None:
                if bool(slot_valid.all()):
                    return None  # kept slots are sorted, so plain causal attention is still right
                allowed = torch.ones(b, width, width, dtype=torch.bool, device=device).tril()
            allowed = allowed & slot_valid[:, None, :]
            # a padding slot attends to itself only, so no row is empty (an empty row gives NaN)
            allowed |= torch.eye(width, dtype=torch.bool, device=device) & ~slot_valid[:, :, None]
        else:
            new = self._decoded
            key_ok = torch.cat([slot_valid, torch.ones(b, new, dtype=torch.bool, device=device)], dim=1)
            if mask is not None and mask.dim() == 2:
                return key_ok.to(mask.dtype)
            if mask is None and q_len == 1 and bool(slot_valid.all()):
                return None
            rows = torch.arange(new - q_len, new, device=device)[:, None]
            causal = torch.arange(new, device=device)[None, :] <= rows  # among the generated tokens
            allowed = key_ok[:, None, :] & torch.cat([causal.new_ones(q_len, width), causal], dim=1)[None]
        if mask is None or mask.dtype == torch.bool:
            return allowed[:, None]
        return additive_mask(allowed, mask.dtype)[:, None]


def _gather_square(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, L', L') bool: a (B|1, 1, L, L) mask at the kept rows and columns of each batch row."""
    m = allowed_keys(mask[:, 0].expand(idx.shape[0], -1, -1))
    m = torch.gather(m, 1, idx[:, :, None].expand(-1, -1, m.shape[2]))
    return torch.gather(m, 2, idx[:, None, :].expand(-1, m.shape[1], -1))


def _take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b]] for a (B|1, L, ...) tensor: the kept slots of each row."""
    t = t.expand(idx.shape[0], *t.shape[1:])
    index = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return torch.gather(t, 1, index)


def _row_probs(call: AttentionCall, start: int, end: int) -> torch.Tensor:
    """(B, end-start, K) head-mean attention probabilities of query rows start:end (a row probe, fp32)."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    sub = dataclasses.replace(call, query=call.query[:, :, start:end])
    logits = row_logits(sub, 0)
    mask = call.attention_mask
    if mask is None:
        rows = torch.arange(start, end, device=logits.device)[:, None] + (k_len - q_len)
        allowed = (torch.arange(k_len, device=logits.device)[None, :] <= rows)[None, None]
    else:
        allowed = allowed_keys(mask[:, :, start:end, :k_len])
    return masked_softmax(logits, allowed).mean(dim=1)
