"""Attention capture as a core service: any method can read rows of attention probabilities at chosen text layers
for the forward in flight, without taking that layer's editor slot.

    sub = subscribe_attention(steering, layers=[20, 21], callback=fn, rows=slice(-1, None), head_mean=True)
    ...  # every unpaused attention call of those layers calls fn(CapturedRows(...)) while sub.when() is true
    sub.remove()  # or return sub from Method.attach: Steering.remove removes it

What a subscriber sees: the softmax probabilities of the chosen query rows over the keys of the call, from the
q and k that the layer computed (RoPE applied, GQA-aware, the call's own mask, logit softcap), in float32. They
are **pre-edit at the subscribed layer**: an attention editor on the same layer (VAR, PAI, FastV, ...) reweights
attention after the probe has read it, and the capture does not see that reweighting. Everything upstream is
included: the hidden states that reach the layer carry every edit of earlier layers and of other methods (head
scaling, earlier layers' attention edits), so the rows are those of the steered model. Only the chosen rows are
computed (O(rows x keys) per head, never the (q x k) matrix of the forward), and several subscribers of one layer
share one probe: the rows are computed once, for the union of their rows, and sliced per subscriber.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lvlm_steer.attention import AttentionCall, route_of
from lvlm_steer.attention_rows import masked_softmax, row_logits, rows_mask
from lvlm_steer.errors import SteeringError

if TYPE_CHECKING:
    from lvlm_steer.context import ForwardContext
    from lvlm_steer.steering import Steering

LAST_ROW = slice(-1, None)


@dataclass
class CapturedRows:
    """One layer's captured attention rows for one subscriber, in the forward in flight."""

    layer: int
    probs: torch.Tensor  # (B, H | 1 with head_mean, R, K | C with columns) float32 probabilities
    rows: range  # the call's query rows (indices into this forward's new tokens)
    key_len: int  # keys the call saw (a sliding-window layer sees only the last ones)
    context: ForwardContext  # phase, image / padding masks of the forward


class AttentionSubscription:
    """One subscriber's request; `remove` takes it off (idempotent), like a torch hook handle."""

    def __init__(
        self,
        callback: Callable[[CapturedRows], None],
        rows: slice,
        columns: torch.Tensor | None,
        head_mean: bool,
        when: Callable[[], bool] | None,
    ) -> None:
        self.callback, self.rows, self.columns, self.head_mean = callback, rows, columns, head_mean
        self.when = when
        self._probes: list[_LayerProbe] = []

    @property
    def active(self) -> bool:
        return self.when is None or bool(self.when())

    def remove(self) -> None:
        for probe in self._probes:
            probe.drop(self)
        self._probes.clear()


class _LayerProbe:
    """The one observer of a layer's route, shared by every subscription to that layer."""

    def __init__(self, route) -> None:
        self.route = route
        self.subscriptions: list[AttentionSubscription] = []

    def add(self, sub: AttentionSubscription) -> None:
        if not self.subscriptions:
            self.route.observers.append(self)
        self.subscriptions.append(sub)
        sub._probes.append(self)

    def drop(self, sub: AttentionSubscription) -> None:
        if sub in self.subscriptions:
            self.subscriptions.remove(sub)
        if not self.subscriptions and self in self.route.observers:
            self.route.observers.remove(self)

    def __call__(self, call: AttentionCall) -> None:
        active = [s for s in self.subscriptions if s.active]
        if not active:
            return
        q_len = call.query.shape[2]
        spans = [range(*s.rows.indices(q_len)) for s in active]
        start = min((r.start for r in spans if len(r)), default=q_len)
        if start >= q_len:
            return
        probs = masked_softmax(row_logits(call, start), rows_mask(call, start))  # (B, H, q_len - start, K)
        head_mean = probs.mean(dim=1, keepdim=True) if any(s.head_mean for s in active) else None
        for sub, span in zip(active, spans, strict=True):
            if not len(span):
                continue
            chosen = (head_mean if sub.head_mean else probs)[:, :, span.start - start : span.stop - start]
            if sub.columns is not None:
                chosen = _columns(chosen, sub.columns)
            sub.callback(CapturedRows(call.layer_idx, chosen, span, call.key.shape[2], call.context))


def _columns(probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Key columns of (B, H, R, K): ``columns`` (C,) for every row or (B, C) per batch row."""
    columns = columns.to(probs.device)
    if columns.dim() == 1:
        return probs[..., columns]
    index = columns[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
    return probs.gather(-1, index)


def subscribe_attention(
    steering: Steering,
    layers: Iterable[int],
    callback: Callable[[CapturedRows], None],
    *,
    rows: slice = LAST_ROW,
    columns: torch.Tensor | None = None,
    head_mean: bool = False,
    when: Callable[[], bool] | None = None,
) -> AttentionSubscription:
    """Call ``callback`` with the attention rows of ``layers`` on every steered forward (see the module docstring).

    ``rows``: a slice of the call's query rows (default: the last row; at decode a call has one row per new
    token). ``columns``: key columns to keep ((C,) or (B, C) per batch row; default all keys). ``head_mean``:
    average over heads (B, 1, R, ·). ``when``: the probe runs only while this returns True (e.g. during a
    method's own capture passes), so an idle subscription costs nothing. The callback may raise to end the
    forward early (the exception propagates out of the model call).
    """
    modules = steering.adapter.attention_modules()
    layers = sorted(set(layers))
    bad = [layer for layer in layers if not 0 <= layer < len(modules)]
    if bad:
        raise SteeringError(f"attention capture: layers {bad} are outside the text layers 0..{len(modules) - 1}")
    sub = AttentionSubscription(callback, rows, columns, head_mean, when)
    for layer in layers:
        route = route_of(modules[layer])
        if route is None:
            sub.remove()
            raise SteeringError("attention capture needs a steered model: subscribe from Method.attach")
        probe = next((o for o in route.observers if isinstance(o, _LayerProbe)), None) or _LayerProbe(route)
        probe.add(sub)
    return sub
