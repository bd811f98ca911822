"""Attention-sink tokens from massive activations (VAR, "See What You Are Told", ICLR 2025).

VAR calls key ``j`` a sink in layer ``l`` when ``max_{d in D_sink} |x_j[d] / RMS(x_j)| > tau`` (``tau = 20``), with
``x_j`` the hidden state entering decoder layer ``l`` and ``RMS`` an RMSNorm without weight. ``D_sink`` is a handful of
hidden dimensions that carry the model's "massive activations"; this module

* knows the sets published for a few models (``KNOWN_SINK_DIMS``, ``known_sink_dims``),
* scores and masks sink tokens given a set (``sink_scores``, ``sink_mask``),
* discovers the set for any other model from one forward pass (``find_sink_dims``, cached by ``cached_sink_dims``),
* measures how much attention a set of key positions receives (``attention_share_of_tokens``), to check that the
  discovered tokens really are sinks,
* prints a discovery as a short table (``format_sink_report``).

Discovery, in words. For every token ``j`` and dimension ``d`` of a layer input, ``ratio_j[d] = |x_j[d]| / median_d'
|x_j[d']|``. A token is a *sink token* of the layer when its peak ratio exceeds ``ratio`` and is at least ``contrast``
times the typical (median over the row's tokens) peak ratio. On a sink token, a dimension is *massive* when its ratio
exceeds ``ratio`` and is at least ``contrast`` times that dimension's typical ratio over the row's tokens (a channel
that is large on every token is not a sink channel). ``D_sink`` is the set of dimensions massive in at least
``min_layer_frac`` of the scanned layers, ranked by their peak ratio. Only the hidden states come back from the model,
so any attention implementation works (no eager switch).

Note on ``tau``: ``|x[d]| / RMS(x) <= sqrt(H)`` for a hidden size ``H`` (equality when one dimension holds all the
energy), so ``tau = 20`` is reachable only for ``H > 400`` and is close to the ceiling for small models (SmolLM2-135M,
``H = 576``, peaks at about 23.8).
"""

from lvlm_steer.sink_discovery import (
    LayerSinks,
    SinkReport,
    SinkToken,
    cached_sink_dims,
    cached_sink_report,
    clear_sink_cache,
    find_sink_dims,
)
from lvlm_steer.sink_known import DEFAULT_TAU, KNOWN_SINK_DIMS, known_sink_dims, sink_mask, sink_scores
from lvlm_steer.sink_reports import attention_share_of_tokens, format_sink_report

__all__ = [
    "DEFAULT_TAU",
    "KNOWN_SINK_DIMS",
    "LayerSinks",
    "SinkReport",
    "SinkToken",
    "attention_share_of_tokens",
    "cached_sink_dims",
    "cached_sink_report",
    "clear_sink_cache",
    "find_sink_dims",
    "format_sink_report",
    "known_sink_dims",
    "sink_mask",
    "sink_scores",
]
