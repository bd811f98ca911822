"""Attention math for a few query rows of one attention call (the rows a method edits), GQA-aware.

Methods that edit attention recompute only their rows: PAI the last row, VAR the text rows after the image
(one row at decode). Everything here is O(rows x keys): the (q x k) matrix of the whole forward is never
built. The mask comes from the call (transformers' sdpa/eager mask); when transformers passed none (a purely
causal batch without padding), the causal mask for the chosen rows is built here.
"""

from __future__ import annotations

import torch

from lvlm_steer.attention import AttentionCall
from lvlm_steer.errors import SteeringError
from lvlm_steer.masks import allowed_keys


def call_scaling(call: AttentionCall) -> float:
    scaling = call.kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(call.module, "scaling", None)
    return float(scaling if scaling is not None else call.query.shape[-1] ** -0.5)


def softcap(call: AttentionCall) -> float | None:
    return getattr(getattr(call.module, "config", None), "attn_logit_softcapping", None)


def rows_mask(call: AttentionCall, start: int) -> torch.Tensor:
    """(B|1, 1, R, K) bool mask (True = may attend) for query rows ``start:`` of the call."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    mask = call.attention_mask
    if mask is None:
        # pure causal: query row i (of q_len, the last rows of the key sequence) sees keys <= k_len - q_len + i
        rows = torch.arange(start, q_len, device=call.query.device)[:, None] + (k_len - q_len)
        return (torch.arange(k_len, device=call.query.device)[None, :] <= rows)[None, None]
    mask = mask[:, :, start:, :k_len] if mask.shape[2] == q_len else mask[:, :, -(q_len - start) :, :k_len]
    return allowed_keys(mask)


def row_logits(call: AttentionCall, start: int) -> torch.Tensor:
    """(B, H, R, K) fp32 scaled logits of query rows ``start:`` against all keys (softcap applied, mask not)."""
    q = call.query[:, :, start:].float()
    b, h, r, d = q.shape
    h_kv = call.key.shape[1]
    grouped = q.reshape(b, h_kv, (h // h_kv) * r, d)  # GQA: query heads of one KV head side by side, no K/V copy
    logits = torch.matmul(grouped, call.key.float().transpose(-1, -2)) * call_scaling(call)
    logits = logits.reshape(b, h, r, -1)
    cap = softcap(call)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with hidden keys at probability 0; a row with no visible key gets all zeros."""
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def attend(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(B, H, R, K) probabilities @ (B, H_kv, K, D) values -> (B, H, R, D), GQA-aware."""
    b, h, r, k = probs.shape
    h_kv = value.shape[1]
    grouped = probs.reshape(b, h_kv, (h // h_kv) * r, k)
    return torch.matmul(grouped, value.float()).reshape(b, h, r, -1)


def align_to_keys(mask: torch.Tensor, key_len: int) -> torch.Tensor:
    """A per-key mask recorded at prefill, aligned to ``key_len`` keys along the last axis: new (decoded) keys are
    False, and a sliding-window layer that holds only the last ``key_len`` keys gets the last columns."""
    if key_len >= mask.shape[-1]:
        return torch.nn.functional.pad(mask, (0, key_len - mask.shape[-1]), value=False)
    return mask[..., mask.shape[-1] - key_len :]


def recorded_key_mask(
    store: dict[int, torch.Tensor], layer: int, key_len: int, device: torch.device, owner: str
) -> torch.Tensor:
    """A method's per-key mask recorded for ``layer`` at prefill, on ``device`` and aligned to ``key_len`` keys."""
    mask = store.get(layer)
    if mask is None:
        raise SteeringError(f"{owner}: nothing recorded for layer {layer}; the prefill must run under the steering")
    return align_to_keys(mask.to(device), key_len)


def replace_rows(base: torch.Tensor, start: int, rows: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Put edited rows (B, H, R, D) into the base output (B, q, H, D) at ``start:``; ``keep`` (B, H, R) picks base."""
    new = rows.to(base.dtype)
    if keep is not None:
        new = torch.where(keep[..., None], base[:, start:].transpose(1, 2), new)
    out = base.clone()
    out[:, start:] = new.transpose(1, 2)
    return out
