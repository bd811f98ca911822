"""Slow references for the attention-editing methods, written straight from the papers' equations on fully
materialised eager attention (every query row, the whole probability matrix).

They share nothing with the fast paths (which recompute only the edited rows, or use grouped kernels) except the
sink detection hooks, so tests compare the two, and `lvlm-steer bench attention` times the eager reference.
"""

from __future__ import annotations

import torch

import lvlm_steer as ls
from lvlm_steer.masks import allowed_keys


def full_logits(call) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, q, K) fp32 scaled logits of every query row, and the (B|1, 1, q, K) visibility mask."""
    q = call.query.float()
    n_rep = q.shape[1] // call.key.shape[1]
    k = call.key.float().repeat_interleave(n_rep, dim=1)
    scaling = call.kwargs.get("scaling") or call.module.scaling
    z = q @ k.transpose(-1, -2) * scaling
    q_len, k_len = q.shape[2], k.shape[2]
    mask = call.attention_mask
    if mask is None:
        rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=q.device)[None, :] <= rows)[None, None]
    else:
        mask = allowed_keys(mask)
    return z, mask[..., :k_len]


def softmax_attend(call, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over visible keys, times V; returns (B, q, H, D) in the call's dtype."""
    probs = torch.nan_to_num(torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1))
    return from_probs(call, probs)


def from_probs(call, probs: torch.Tensor) -> torch.Tensor:
    n_rep = probs.shape[1] // call.value.shape[1]
    v = call.value.float().repeat_interleave(n_rep, dim=1)
    return (probs @ v).transpose(1, 2).to(call.query.dtype)


def probabilities(call) -> tuple[torch.Tensor, torch.Tensor]:
    z, mask = full_logits(call)
    return torch.nan_to_num(torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1)), mask


class PAIReference(ls.PAI):
    """PAI straight from its equation on the full logits: Z[:, :, -1, img] += alpha * |Z[:, :, -1, img]|."""

    def edit_attention(self, call):
        z, mask = full_logits(call)
        image = call.context.keys_image_mask(z.shape[-1])[:, None, :]
        last = z[:, :, -1]
        z[:, :, -1] = torch.where(image, last + self.alpha * last.abs(), last)
        return softmax_attend(call, z, mask)


def _after_image_rows(call, q_len: int, k_len: int) -> torch.Tensor:
    """(B, 1, q, 1): rows a prefill edit may touch (text after the row's last image token); all rows at decode."""
    if call.context.phase != "prefill":
        return torch.ones(call.query.shape[0], 1, q_len, 1, dtype=torch.bool, device=call.query.device)
    image = call.context.keys_image_mask(k_len).to(call.query.device)
    last = torch.where(image, torch.arange(k_len, device=image.device), -1).max(dim=1).values
    slots = torch.arange(q_len, device=image.device) + (k_len - q_len)
    return (slots[None, :] > last[:, None])[:, None, :, None]


class VARReference(ls.VAR):
    """VAR from the paper on the full probability matrix (sinks from the shared detection hooks)."""

    def edit_attention(self, call):
        probs, _ = probabilities(call)
        q_len, k_len = probs.shape[2], probs.shape[3]
        image = call.context.keys_image_mask(k_len)[:, None, None, :]
        sinks = self._key_sinks(call.layer_idx, k_len, probs.device)[:, None, None, :]
        img_mass = (probs * image).sum(-1, keepdim=True)
        nonsink = (probs * (image & ~sinks)).sum(-1, keepdim=True)
        share = torch.where(img_mass > 0, nonsink / img_mass.clamp(min=1e-30), torch.zeros_like(img_mass))
        chosen = (img_mass >= self.image_mass) & (share >= self.rho) & _after_image_rows(call, q_len, k_len)
        freed = self.p * (probs * sinks).sum(-1, keepdim=True)
        edited = torch.where(sinks, (1 - self.p) * probs, probs)
        edited = edited + torch.where(image & ~sinks, freed * probs / nonsink.clamp(min=1e-30), 0.0)
        return from_probs(call, torch.where(chosen, edited, probs))


class ACTReference(ls.ACT):
    """ACT from the paper on the full probability matrix; sinks from the prompt's rows, fixed for decode."""

    def edit_attention(self, call):
        probs, mask = probabilities(call)
        layer, q_len, k_len = call.layer_idx, probs.shape[2], probs.shape[3]
        heads = self._head_masks[layer]
        if call.context.phase == "prefill":
            rows = call.context.keys_valid_mask(q_len)[:, None, :, None]
            score = (probs * rows).sum(2) / (mask & rows).sum(2).clamp(min=1)
            sinks = (score > self.threshold) & heads[None, :, None]
            self._sinks[layer] = sinks & ~(torch.cumsum(sinks.long(), -1) == 1)
        sinks = torch.nn.functional.pad(self._sinks[layer], (0, k_len - self._sinks[layer].shape[-1]))[:, :, None]
        freed = (1 - self.beta) * (probs * sinks).sum(-1, keepdim=True)
        others = torch.where(sinks, 0.0, probs)
        edited = torch.where(sinks, self.beta * probs, probs) + freed * others / others.sum(-1, keepdim=True).clamp(
            min=1e-30
        )
        return from_probs(call, edited)
