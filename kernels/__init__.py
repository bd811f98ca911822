"""Attention split by key group, for edits that move attention mass between groups of keys.

For each group g of keys, ``grouped_attention`` returns the group-normalised output O_g and its log-sum-exp L_g
for the given query rows. Full attention is sum_g m_g O_g with m = ``group_masses(L)``; an edit that only changes
the group masses (keeping proportions inside each group) is ``combine_groups(O, new_masses)``, exactly, without
materialising the (Q x K) probability matrix. Pure tensor functions, no model knowledge.

    O, L = grouped_attention(q, k, v, key_groups, num_groups, mask=None, scaling=None, backend="auto")
    m = group_masses(L)                  # (G, B, H, Q)
    out = combine_groups(O, new_masses)  # (B, H, Q, D)
    P = row_probe(q, k, mask)            # (B, H, Q, K) probabilities of these rows only
    out, P = attention_reference(q, k, v, mask)
"""

from .common import HIDDEN_BIAS
from .dispatch import BACKENDS, grouped_attention, select_backend
from .flash import FlashUnavailableError
from .masses import combine_groups, group_masses
from .reference import attention_reference, row_probe
from .triton_grouped import TritonUnavailableError

__all__ = [
    "BACKENDS",
    "HIDDEN_BIAS",
    "FlashUnavailableError",
    "TritonUnavailableError",
    "attention_reference",
    "combine_groups",
    "group_masses",
    "grouped_attention",
    "row_probe",
    "select_backend",
]
