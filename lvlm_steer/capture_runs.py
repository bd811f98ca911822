"""Greedy capture runs: decode prompts about one image under a steering and record, per generated step, the
head-mean attention of the last query row to the image's grid cells at chosen text layers.

Used by input-refining methods (CARVE; AGLA's prompt-relevant view): `CaptureRunner.run` takes the processor's
encodings of the prompts (the same image in each) and the key slots of the image cells. Fast paths: the prompts'
common prefix (which holds the image) is prefilled once and its cache shared; with ``paired`` the runs after the
first stop after as many steps as the first took; two runs can decode side by side as one batch of two rows
(``batch_decode``); the last step stops right after the last captured layer. The attention comes from
the core capture service (`lvlm_steer.capture`), so the runner never takes a layer's editor slot.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from lvlm_steer.capture import CapturedRows, subscribe_attention
from lvlm_steer.compat import cache_argument
from lvlm_steer.errors import SteeringError


class CaptureDone(Exception):
    """Raised inside the last capture forward once the last captured layer is read (the rest is not needed)."""


@dataclass
class Attention:
    """One capture run: ``rows`` (steps, layers, image cells) head-mean attention, and the generated ``tokens``.

    ``complete`` is False when the run was cut short by a step limit below the runner's ``max_steps`` (pairing
    with a shorter run needs no more steps); such a run may be too short for a later, longer pairing.
    """

    rows: torch.Tensor
    tokens: list[int]
    prompt_ids: torch.Tensor
    complete: bool = True

    @property
    def steps(self) -> int:
        return int(self.rows.shape[0])


class Recording:
    """Recording state while capture forwards run: one or more runs, each fed by one batch row."""

    def __init__(self, layers: range, columns: torch.Tensor, runs: int = 1) -> None:
        self.layers = layers
        self.columns = [columns] * runs  # per run: key slots of the image's grid cells, in tile order
        self.seq_len = 0  # keys the forward in flight sees (prefix + everything fed so far)
        self.stop_after: int | None = None
        self.steps: list[list[dict[int, torch.Tensor]]] = [[] for _ in range(runs)]
        self.feeding: list[int | None] = [0]  # the run each batch row of the forward in flight belongs to

    def begin_step(self) -> None:
        for run in self.feeding:
            if run is not None:
                self.steps[run].append({})

    def record(self, layer: int, mean: torch.Tensor, key_len: int) -> None:
        """``mean`` (B, K): the last row's head-mean probabilities of each batch row."""
        offset = self.seq_len - key_len  # a sliding-window layer holds only the last keys
        for b, run in enumerate(self.feeding):
            if run is None:
                continue
            if offset > int(self.columns[run].min()):
                raise SteeringError(
                    f"attention capture: layer {layer} no longer sees the image (sliding window); choose other layers"
                )
            self.steps[run][-1][layer] = mean[b, self.columns[run].to(mean.device) - offset]

    def stacked(self, run: int = 0) -> torch.Tensor:
        steps = self.steps[run]
        return torch.stack([torch.stack([s[layer] for layer in self.layers]) for s in steps]).float().cpu()


class CaptureRunner:
    """Capture runs on one steered model at ``layers``; `subscription` goes into the method's attach handles."""

    def __init__(self, steering, layers: range, max_steps: int) -> None:
        self.steering, self.layers, self.max_steps = steering, layers, max_steps
        self.recording: Recording | None = None
        self.subscription = subscribe_attention(
            steering, layers, self._on_rows, head_mean=True, when=lambda: self.recording is not None
        )

    def _on_rows(self, captured: CapturedRows) -> None:
        rec = self.recording
        rec.record(captured.layer, captured.probs[:, 0, 0], captured.key_len)
        if rec.stop_after == captured.layer:
            raise CaptureDone

    def run(
        self, encs: list[dict], columns: torch.Tensor, limit: int, paired: bool = False, batch_decode: bool = False
    ) -> list[Attention]:
        """Greedy runs of the encoded prompts (one row each, same image), at most ``limit`` steps each.

        ``columns``: the key slots of the image cells in the prompts. ``paired``: runs after the first stop after
        as many steps as the first took; with ``batch_decode`` two paired runs decode side by side.
        """
        steering = self.steering
        model = steering.model
        ids = [e["input_ids"][0] for e in encs]
        prefix = common_prefix(ids)
        spans = steering.adapter.image_spans(ids[0])
        if prefix < max(e for _, e in spans) or steering.adapter.bidirectional_prompt:
            prefix = 0  # the image is not in the shared prefix, or the prefix sees what follows: prefill each alone
        params = inspect.signature(model.forward).parameters
        cache_kw = cache_argument(model)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # one row without padding: no attention mask (a causal forward); per-token inputs are sliced like the ids
        adapter = steering.adapter
        shape = encs[0]["input_ids"].shape
        token_keys = ["input_ids"] + [
            k for k in adapter.token_inputs if torch.is_tensor(encs[0].get(k)) and encs[0][k].shape == shape
        ]
        vision = adapter.vision_inputs(encs[0])
        from transformers import DynamicCache

        runs: list[Attention] = []
        with torch.inference_mode(), steering.adapter.isolated_state():
            shared = DynamicCache()
            if prefix:
                head = {k: encs[0][k][:, :prefix] for k in token_keys} | vision
                model(**to_model(head, model), **{cache_kw: shared}, use_cache=True, **extra)
            side_by_side = paired and len(encs) == 2 and prefix and limit > 1 and batch_decode
            if side_by_side and _batchable(steering.adapter, shared):
                pair = _Pair(self, cache_kw, extra, prefix, token_keys)
                return pair.run(encs, columns, limit, shared)
            for n, enc in enumerate(encs):
                cache = shared if n == len(encs) - 1 else copy.deepcopy(shared)
                feed = {k: enc[k][:, prefix:] for k in token_keys} | ({} if prefix else vision)
                rec = Recording(self.layers, columns)
                steps = runs[0].steps if paired and runs else limit
                tokens = self._greedy(rec, steps, to_model(feed, model), cache, cache_kw, extra, prefix, token_keys)
                runs.append(self.attention(rec.stacked(), tokens, enc["input_ids"], steps))
        return runs

    def attention(self, rows: torch.Tensor, tokens: list[int], prompt_ids, limit: int) -> Attention:
        cut = rows.shape[0] == limit < self.max_steps and (not tokens or tokens[-1] not in eos_ids(self.steering.model))
        return Attention(rows, tokens, prompt_ids, complete=not cut)

    def _greedy(self, rec, limit, feed, cache, cache_kw, extra, prefix, token_keys) -> list[int]:
        steering = self.steering
        eos = eos_ids(steering.model)
        banned = [steering.adapter.image_token_id]
        generated_type = steering.adapter.generated_token_type
        rec.seq_len = prefix + feed["input_ids"].shape[1]
        tokens: list[int] = []
        self.recording = rec
        try:
            for t in range(limit):
                rec.begin_step()
                rec.stop_after = rec.layers[-1] if t == limit - 1 else None
                try:
                    out = steering.model(**feed, **{cache_kw: cache}, use_cache=True, **extra)
                except CaptureDone:
                    break
                scores = out.logits[0, -1].float()
                scores[banned] = float("-inf")
                token = int(scores.argmax())
                tokens.append(token)
                if token in eos:
                    break
                ids = torch.tensor([[token]], device=feed["input_ids"].device)
                feed = {"input_ids": ids} | {
                    k: torch.full_like(ids, generated_type) for k in token_keys if k != "input_ids"
                }
                rec.seq_len += 1
        finally:
            self.recording = None
        return tokens


class _Pair:
    """Two capture runs decoded side by side, one batch row each.

    After the shared prefix, each prompt's own text is one forward (its own cache copy, so no padding inside
    the prompt); then the two caches are joined into one batch, the shorter left-padded with masked slots, and
    every later step feeds both rows at their true positions (1-D position ids; the adapter says when a model
    needs more). Decoding two rows costs little more than one where the weights dominate.
    """

    def __init__(self, runner: CaptureRunner, cache_kw: str, extra: dict, prefix: int, token_keys) -> None:
        self.runner, self.steering, self.layers = runner, runner.steering, runner.layers
        self.model = runner.steering.model
        self.cache_kw, self.extra, self.prefix, self.token_keys = cache_kw, extra, prefix, token_keys
        self.eos = eos_ids(self.model)
        self.banned = [self.steering.adapter.image_token_id]

    def forward(self, feed: dict[str, Any], cache) -> torch.Tensor:
        out = self.model(**to_model(feed, self.model), **{self.cache_kw: cache}, use_cache=True, **self.extra)
        scores = out.logits[:, -1].float()
        scores[:, self.banned] = float("-inf")
        return scores.argmax(-1).cpu()

    def run(self, encs: list[dict], columns: torch.Tensor, limit: int, shared) -> list[Attention]:
        rec = Recording(self.layers, columns, runs=2)
        caches = [copy.deepcopy(shared), shared]
        tokens: list[list[int]] = [[], []]
        done = [False, False]
        lengths = []
        self.runner.recording = rec
        try:
            for r, enc in enumerate(encs):  # step 1: each prompt's own text, alone
                feed = {k: enc[k][:, self.prefix :] for k in self.token_keys}
                rec.feeding, rec.seq_len = [r], self.prefix + feed["input_ids"].shape[1]
                lengths.append(rec.seq_len)
                rec.begin_step()
                tokens[r].append(int(self.forward(feed, caches[r])[0]))
                done[r] = tokens[r][-1] in self.eos
            # one spare masked slot: the joined cache is longer than any single-row sequence the steering's
            # per-forward context recorded, so the context starts afresh for the new (two-row) batch
            width = max(lengths) + 1
            pads = [width - n for n in lengths]
            rec.columns = [columns + pad for pad in pads]
            cache = _join_left_padded(caches, pads)
            valid = torch.ones(2, width, dtype=torch.long)
            for r, pad in enumerate(pads):
                valid[r, :pad] = 0
            generated = self.steering.adapter.generated_token_type
            for t in range(1, limit):
                if done[0]:  # paired: the second run needs no more steps than the first took
                    break
                ids = torch.tensor([[tokens[0][-1]], [tokens[1][-1]]])
                valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.long)], dim=1)
                feed = {
                    "input_ids": ids,
                    "attention_mask": valid,
                    "position_ids": torch.tensor([[lengths[0] + t - 1], [lengths[1] + t - 1]]),
                } | {k: torch.full_like(ids, generated) for k in self.token_keys if k != "input_ids"}
                rec.feeding = [None if d else r for r, d in enumerate(done)]
                rec.seq_len = width + t
                rec.begin_step()
                rec.stop_after = self.layers[-1] if t == limit - 1 else None
                try:
                    step = self.forward(feed, cache)
                except CaptureDone:
                    break
                for r in range(2):
                    if not done[r]:
                        tokens[r].append(int(step[r]))
                        done[r] = tokens[r][-1] in self.eos
        finally:
            self.runner.recording = None
        first = self.runner.attention(rec.stacked(0), tokens[0], encs[0]["input_ids"], limit)
        second = self.runner.attention(rec.stacked(1), tokens[1], encs[1]["input_ids"], first.steps)
        return [first, second]


def _batchable(adapter, cache) -> bool:
    """Rows can be decoded side by side: 1-D position ids, and every cache layer holds all keys (no window)."""
    return adapter.plain_position_ids and all(k is not None and s is None for k, _, s in cache)


def _join_left_padded(caches: list, pads: list[int]):
    """One batch cache from single-row caches, row r left-padded by ``pads[r]`` slots (masked by the caller)."""
    from transformers import DynamicCache

    layers = []
    for per_row in zip(*caches, strict=True):
        keys = [torch.nn.functional.pad(k, (0, 0, pad, 0)) for (k, _, _), pad in zip(per_row, pads, strict=True)]
        values = [torch.nn.functional.pad(v, (0, 0, pad, 0)) for (_, v, _), pad in zip(per_row, pads, strict=True)]
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache(ddp_cache_data=layers)


def common_prefix(rows: list[torch.Tensor]) -> int:
    """Length of the common prefix of all rows, leaving at least one token of each row to feed."""
    n = min(r.shape[0] for r in rows) - 1
    for r in rows[1:]:
        diff = (rows[0][:n] != r[:n]).nonzero()
        n = int(diff[0]) if diff.numel() else n
    return n


def eos_ids(model) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def to_model(inputs: dict[str, Any], model) -> dict[str, Any]:
    """Tensors onto the model's device; float tensors (pixels) in the model's dtype."""
    param = next(model.parameters())
    dtype = getattr(model, "dtype", param.dtype)
    return {
        k: (v.to(param.device, dtype) if v.is_floating_point() else v.to(param.device)) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }
