"""The two ways `lvlm_steer.streams` runs auxiliary streams: joined into the main forward, or one forward each.

See `lvlm_steer.streams` for when each is used. Both insert their combine processor at the front of the user's
``logits_processor`` list and otherwise leave ``generate`` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from lvlm_steer.compat import cache_from, cache_kwargs
from lvlm_steer.streams import Batch, CombineRule, StepScores, stream_forward

if TYPE_CHECKING:
    from lvlm_steer.adapters import Adapter
    from lvlm_steer.steering import Steering


def join_batches(adapter: Adapter, batches: list[Batch]) -> tuple[Batch | None, str | None]:
    """One batch holding every batch's rows in order (re-left-padded to one width), or (None, why not).

    Per-token inputs (``input_ids``, ``attention_mask``, the adapter's `token_inputs`) are padded on the left;
    every other tensor (pixel values, image grids/sizes, pixel masks) is concatenated along its first axis, which
    lists images (or rows of images) in row order, so it must agree in its other dimensions.
    """
    width = max(b["input_ids"].shape[1] for b in batches)
    token_keys = ["input_ids", "attention_mask", *[k for k in adapter.token_inputs if any(k in b for b in batches)]]
    out: Batch = {}
    for key in token_keys:
        pad = adapter.pad_token_id if key == "input_ids" else 0
        parts = []
        for b in batches:
            value = b.get(key)
            if value is None:  # e.g. a token-type input the transform dropped: 0 marks plain text
                value = torch.zeros_like(b["input_ids"])
            parts.append(_left_pad(value, width, pad))
        out[key] = torch.cat(parts)
    others = {k for b in batches for k, v in b.items() if isinstance(v, torch.Tensor) and k not in token_keys}
    for key in sorted(others):
        parts = [b[key] for b in batches if isinstance(b.get(key), torch.Tensor)]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1 or any(p.dim() == 0 for p in parts):
            return None, f"the streams' {key} tensors do not concatenate (shapes {[tuple(p.shape) for p in parts]})"
        out[key] = torch.cat(parts)
    return out, None


def _left_pad(value: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    extra = width - value.shape[1]
    if extra == 0:
        return value
    return torch.cat([value.new_full((value.shape[0], extra), pad), value], dim=1)


def _merged(options: dict[str, Any], processor: Any, criterion: Any = None) -> dict[str, Any]:
    """``options`` with ``processor`` first in the user's logits processors (and ``criterion`` added)."""
    out = dict(options)
    processors = LogitsProcessorList(out.pop("logits_processor", None) or [])
    processors.insert(0, processor)
    out["logits_processor"] = processors
    if criterion is not None:
        criteria = StoppingCriteriaList(out.pop("stopping_criteria", None) or [])
        criteria.append(criterion)
        out["stopping_criteria"] = criteria
    return out


class SequentialRun:
    """The main stream in ``generate`` (steered); each auxiliary stream one paused forward per step."""

    def __init__(self, steering: Steering, batches: list[Batch], names: list[str], combine: CombineRule) -> None:
        self.steering = steering
        self.batches = batches
        self.names = names
        self.combine = combine

    def generate(self, main: Batch, options: dict[str, Any]) -> Any:
        processor = _SequentialCombine(
            self.steering, self.batches, self.names, self.combine, main["input_ids"].shape[1]
        )
        return self.steering.model.generate(**main, **_merged(options, processor))


class _SequentialCombine:
    """Logits processor: advance every auxiliary stream by the tokens generated so far, then combine."""

    def __init__(self, steering: Steering, batches: list[Batch], names: list[str], combine, prompt_len: int) -> None:
        self.steering = steering
        self.streams = [_Stream(b) for b in batches]
        self.names = names
        self.combine = combine
        self.prompt_len = prompt_len
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_len :]
        aux = {
            name: s.advance(self.steering, generated, scores.device)
            for name, s in zip(self.names, self.streams, strict=True)
        }
        combined = self.combine(StepScores(scores, aux, input_ids, self.step))
        self.step += 1
        return combined.to(scores.dtype)


class _Stream:
    """One auxiliary stream of a sequential run: its prompt, its cache, its model-level state."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.cache = DynamicCache()
        self.state: dict[str, Any] = {}
        self.fed: int | None = None  # generated tokens already fed (None: the prompt is not in the cache yet)

    def advance(self, steering: Steering, generated: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Feed the tokens the stream has not seen; return its (B, V) fp32 next-token logits."""
        if self.fed is None:
            feed = dict(self.batch)
        else:
            ones = torch.ones_like(generated)
            feed = {
                "input_ids": generated[:, self.fed :],
                "attention_mask": torch.cat([self.batch["attention_mask"].to(ones.device), ones], dim=1),
            }
        self.fed = generated.shape[1]
        feed = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in feed.items()}
        with torch.no_grad():
            out = stream_forward(steering, feed, self.state, **cache_kwargs(steering.model, self.cache), use_cache=True)
        return out.logits[:, -1].float()


class JoinedRun:
    """One ``generate`` over main + auxiliary rows, with the steering paused (nothing edits any row)."""

    def __init__(self, steering: Steering, names: list[str], combine: CombineRule, rows: int) -> None:
        self.steering = steering
        self.names = names
        self.combine = combine
        self.rows = rows
        self.aux: dict[str, torch.Tensor] = {}
        self.extra = 0  # left columns the joined batch added to the main rows

    def generate(self, joined: Batch, options: dict[str, Any], prompt_width: int) -> Any:
        model = self.steering.model
        self.extra = joined["input_ids"].shape[1] - prompt_width
        options = _lengths_as_new_tokens(options, model, prompt_width)
        options = _merged(options, _JoinedCombine(self), _AuxRowsDone(self.rows))
        handles = [
            model.register_forward_pre_hook(self._feed_main_tokens, with_kwargs=True),
            model.register_forward_hook(self._keep_aux_logits),
        ]
        try:
            with self.steering.pause():
                out = model.generate(**joined, **options)
        finally:
            for handle in handles:
                handle.remove()
        return _main_rows(out, self.rows, self.extra)

    def _feed_main_tokens(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """At decode, every auxiliary row eats the token its main row chose (whatever its own row sampled)."""
        ids = kwargs.get("input_ids")
        past = cache_from(kwargs)
        if ids is None or past is None or past.get_seq_length() == 0:
            return None
        ids, b = ids.clone(), self.rows
        for g in range(1, len(self.names) + 1):
            ids[g * b : (g + 1) * b] = ids[:b]
        return args, {**kwargs, "input_ids": ids}

    def _keep_aux_logits(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        logits, b = output.logits[:, -1], self.rows
        self.aux = {name: logits[(g + 1) * b : (g + 2) * b].float() for g, name in enumerate(self.names)}


class _JoinedCombine:
    def __init__(self, run: JoinedRun) -> None:
        self.run = run
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        b = self.run.rows
        step = StepScores(scores[:b], self.run.aux, input_ids[:b, self.run.extra :], self.step)
        combined = self.run.combine(step).to(scores.dtype)
        self.step += 1
        return combined.repeat(scores.shape[0] // b, 1)  # auxiliary rows get the same (their picks are ignored)


class _AuxRowsDone(StoppingCriteria):
    """Auxiliary rows never hold generation open: only the main rows' own criteria decide when it ends."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.rows :] = True
        return done


def _lengths_as_new_tokens(options: dict[str, Any], model: torch.nn.Module, prompt_width: int) -> dict[str, Any]:
    """Total-length limits (``max_length``/``min_length``) counted from the user's prompt width, not the joined one."""
    out = dict(options)
    config = out.get("generation_config") or model.generation_config
    if out.get("max_new_tokens", config.max_new_tokens) is None:
        out["max_new_tokens"] = max(0, out.pop("max_length", config.max_length) - prompt_width)
    out.pop("max_length", None)
    min_length = out.get("min_length", config.min_length) or 0
    if min_length and out.get("min_new_tokens", config.min_new_tokens) is None:
        out["min_new_tokens"] = max(0, min_length - prompt_width)
        out["min_length"] = 0
    return out


def _main_rows(out: Any, rows: int, extra: int) -> Any:
    """``generate``'s result restricted to the main rows, without the joined batch's extra left padding."""
    if isinstance(out, torch.Tensor):
        return out[:rows, extra:]
    out.sequences = out.sequences[:rows, extra:]
    for key in ("scores", "logits", "attentions", "hidden_states"):
        value = getattr(out, key, None)
        if value is not None:
            setattr(out, key, _slice_rows(value, rows))
    return out


def _slice_rows(value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:rows]
    if isinstance(value, tuple):
        return tuple(_slice_rows(v, rows) for v in value)
    return value
