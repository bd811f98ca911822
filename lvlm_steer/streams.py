"""Auxiliary decoding streams: a second (third, ...) view of the batch decoded beside the main stream.

Contrastive and guided decoders (PAI's CFG, VCD, RITUAL, DAMRO, AGLA, LQCD) all do the same thing: build another
batch from the user's batch by an input transform (the prompt without its images, other pixels, a subset of the
vision tokens, another wording), decode it next to the main stream with its own KV cache, feed it the token the
main stream chose, and mix its next-token logits into the main stream's by the method's rule. This module is that
machinery, so a method is its transform plus its combine rule.

How a step runs. `generate_with_streams` drives ``model.generate`` (so stopping criteria, EOS/padding,
``max_new_tokens``, ``return_dict_in_generate``, caches and the vision-encoder precompute all behave as usual) and
inserts one logits processor at the front of the user's ``logits_processor`` list. transformers runs its built-in
processors from the generation config first (``suppress_tokens``, ``min_new_tokens``, ``repetition_penalty``,
...), on the main stream's logits; then our processor replaces the scores by ``combine(StepScores)``; then the
user's own processors and every warper (temperature, top-k, top-p, ...) see the combined scores, and greedy or
sampling picks the token. Every stream is fed that token.

Two ways to run the auxiliary rows (`join`):
- joined: one ``generate`` over B x (S+1) rows (main rows first, then B rows per stream, re-left-padded to one
  width, pixel tensors concatenated along their image axis), so each step is one forward. transformers computes
  per-row positions itself, Qwen-VL's per-row mrope ``rope_deltas`` included (cached on the model for all rows
  for the duration of the call, then restored). A forward pre-hook makes the auxiliary rows eat the main rows'
  tokens, a forward hook keeps their logits for the combine rule, and a stopping criterion keeps them from
  deciding when generation ends. The steering is paused for the whole call, so this mode is used only when
  nothing edits the main stream (the owner has no attention/head edits and is the only method).
- sequential: ``generate`` runs the main stream alone under the steering (other methods' head and attention
  edits apply to it), and each auxiliary stream runs its own forward inside the processor with the steering
  paused (no edits on auxiliary rows), its own DynamicCache and its own copy of model-level state
  (`Adapter.isolated_state`), fed the tokens generated so far.
``join=None`` picks joined where it is possible and sequential otherwise: when another method or an edit of the
owner acts on the main stream, when a ``streamer`` is given (it expects the user's rows), or when the streams'
pixel tensors do not concatenate (e.g. Idefics3/SmolVLM images with a different number of crops per stream).
Prefix-LM (PaliGemma) and mrope (Qwen2-VL/2.5-VL) batches join like any batch (tested on all 11 architectures).
Beam search, assisted decoding and ``negative_prompt_ids`` are refused. In joined mode a returned cache
(``return_dict_in_generate``) holds every stream's rows, and rows that reached EOS keep being computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lvlm_steer.errors import MissingImagesError, SteeringError

if TYPE_CHECKING:
    from lvlm_steer.adapters import Adapter
    from lvlm_steer.method import Method
    from lvlm_steer.steering import Steering

Batch = dict[str, Any]


class StreamTransform(Protocol):
    """Builds an auxiliary stream's model inputs from the main stream's (same rows, same order)."""

    def __call__(self, adapter: Adapter, inputs: Batch) -> Batch: ...


@dataclass(frozen=True)
class TextOnly:
    """The prompt without its images (and their marker tokens): `Adapter.text_only`."""

    def __call__(self, adapter: Adapter, inputs: Batch) -> Batch:
        return adapter.text_only(inputs)


@dataclass(frozen=True)
class AuxStream:
    """One auxiliary stream: a name (the key of its logits in `StepScores.aux`) and its input transform."""

    name: str
    transform: StreamTransform = TextOnly()

    def build(self, adapter: Adapter, inputs: Batch) -> Batch:
        """The stream's model inputs for ``inputs``; checked to have one row per main row."""
        out = dict(self.transform(adapter, inputs))
        ids = out.get("input_ids")
        rows = inputs["input_ids"].shape[0]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != rows:
            raise SteeringError(
                f"stream {self.name!r}: its transform must return input_ids of shape ({rows}, length), one row per "
                f"main row; got {None if ids is None else tuple(getattr(ids, 'shape', ()))}"
            )
        if out.get("attention_mask") is None:
            out["attention_mask"] = torch.ones_like(ids)
        return out


@dataclass
class StepScores:
    """What a combine rule sees at one decode step."""

    main: torch.Tensor  # (B, V) main-stream scores, after generate's built-in (generation-config) processors
    aux: dict[str, torch.Tensor]  # stream name -> (B, V) raw fp32 next-token logits of that stream
    input_ids: torch.Tensor  # (B, t) the main stream's prompt (as the user passed it) + tokens generated so far
    step: int  # 0 for the first new token


CombineRule = Callable[[StepScores], torch.Tensor]


# -- shared pieces of combine rules ------------------------------------------------------------------------------
def plausibility_cut(main: torch.Tensor, beta: float) -> torch.Tensor:
    """Adaptive plausibility constraint: True where ``p_main(token) < beta * max p_main`` (those get -inf).

    ``beta = 0`` cuts nothing (tokens already at -inf stay there through the combination anyway).
    """
    logp = torch.log_softmax(main.float(), dim=-1)
    cutoff = logp.max(dim=-1, keepdim=True).values + float(torch.tensor(float(beta)).log())
    return logp < cutoff


def apply_plausibility(combined: torch.Tensor, main: torch.Tensor, beta: float) -> torch.Tensor:
    """``combined`` with the tokens that fail the plausibility constraint on ``main`` set to -inf."""
    return combined.masked_fill(plausibility_cut(main, beta), float("-inf"))


def neutral_combine(step: StepScores) -> torch.Tensor:
    """The main stream's scores unchanged (the engine still decodes every stream): for tests and as a template."""
    return step.main


# -- one auxiliary forward (also for pre-passes such as VHR's) ----------------------------------------------------
def stream_forward(steering: Steering, batch: Batch, state: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """One forward of an auxiliary stream's batch with the steering paused (no method edits it).

    ``state`` is the stream's own copy of model-level state (Qwen-VL ``rope_deltas``): pass the same dict at every
    step of one stream; without it the outer stream's state is restored afterwards.
    """
    with steering.pause(state):
        return steering.model(**batch, **kwargs)


# -- the engine --------------------------------------------------------------------------------------------------
def generate_with_streams(
    steering: Steering,
    inputs: Batch,
    streams: Sequence[AuxStream],
    combine: CombineRule,
    *,
    owner: Method | None = None,
    join: bool | None = None,
) -> Any:
    """``model.generate(**inputs)`` with ``streams`` decoded beside it and each step's scores from ``combine``.

    ``inputs`` holds the model inputs (tensors: ``input_ids``, ``attention_mask``, pixel inputs, ...) and any
    ``generate`` keyword (``max_new_tokens``, ``do_sample``, ``logits_processor``, ...). ``owner`` is the method
    that declared the streams (used to decide whether joining is safe); ``join`` forces (True) or forbids (False)
    one joined forward per step. Returns what ``generate`` returns, for the main rows only.
    """
    from lvlm_steer.streams_run import JoinedRun, SequentialRun, join_batches

    streams = list(streams)
    names = [s.name for s in streams]
    if not streams or len(set(names)) != len(names):
        raise SteeringError(f"streams need one or more distinct names, got {names}")
    model = steering.model
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    options = {k: v for k, v in inputs.items() if k not in tensors}
    _refuse_unsupported(model, tensors, options)
    main = dict(tensors)
    if main.get("attention_mask") is None:
        main["attention_mask"] = torch.ones_like(main["input_ids"])
    if not bool(main["attention_mask"][:, -1].bool().all()):
        raise SteeringError(
            "auxiliary streams need a left-padded batch (the last column of attention_mask is padding in some row); "
            "build it with processor(..., padding=True, padding_side='left')"
        )
    batches = [s.build(steering.adapter, main) for s in streams]
    joined, reason = None, _why_not_joined(steering, owner, options)
    if reason is None:
        joined, reason = join_batches(steering.adapter, [main, *batches])
    if join is True and joined is None:
        raise SteeringError(f"cannot run the streams in one forward: {reason}; pass join=None to fall back")
    if join is False or joined is None:
        return SequentialRun(steering, batches, names, combine).generate(main, options)
    if owner is not None and owner.requires_images():
        _check_images(steering, owner, main)
    return JoinedRun(steering, names, combine, rows=main["input_ids"].shape[0]).generate(
        joined, options, prompt_width=main["input_ids"].shape[1]
    )


def _why_not_joined(steering: Steering, owner: Method | None, options: dict[str, Any]) -> str | None:
    info = steering.info
    others = [m.spec() for m in steering.methods if m is not owner]
    if others:
        return f"{', '.join(others)} edit the main stream, whose rows must run apart from the auxiliary rows"
    if owner is not None and (owner.attention_layers(info) or owner.claims(info)):
        return f"{owner.spec()} edits the main stream's attention or heads"
    if options.get("streamer") is not None:
        return "a streamer expects the user's rows only"
    return None


def _refuse_unsupported(model: torch.nn.Module, tensors: dict[str, torch.Tensor], options: dict[str, Any]) -> None:
    if "input_ids" not in tensors:
        raise SteeringError("auxiliary streams need input_ids (the streams are built from the token ids)")
    config = options.get("generation_config") or model.generation_config
    beams = options.get("num_beams", getattr(config, "num_beams", 1)) or 1
    if beams > 1:
        raise SteeringError(
            f"auxiliary-stream decoding supports greedy search and sampling, not beam search (num_beams={beams}); "
            "pass num_beams=1"
        )
    for key in ("assistant_model", "prompt_lookup_num_tokens", "negative_prompt_ids"):
        if options.get(key) is not None:
            raise SteeringError(f"auxiliary-stream decoding does not support {key}=...; drop it")


def _check_images(steering: Steering, owner: Method, main: Batch) -> None:
    """The check a steered prefill makes, for the joined run (which runs with the steering paused)."""
    rows = [i for i, has in enumerate(steering.adapter.image_mask(main["input_ids"]).any(1).tolist()) if not has]
    if rows:
        steering.remove()
        raise MissingImagesError(
            f"{owner.spec()} needs image tokens in every row: batch rows {rows} contain no image tokens; give every "
            "row an image. The steering was removed; call steer() again with a valid batch."
        )
