"""`steer()` and the `Steering` handle: wrap a model in place, take it off without a trace.

Attaching does three things, all undone by `Steering.remove` (also on an exception inside ``with``):
1. select our registered attention function for the text model only (the vision tower keeps its own), and
   route every text attention module to the user's original implementation or to an editing method;
2. a top-level forward pre-hook that fills the per-forward context (phase, image-token slots, padding);
3. each method's own hooks (e.g. ``o_proj`` pre-hooks for head edits), registered by its per-model state
   (`Method.bind` returns a `MethodState`; the method object itself keeps only settings).
Only torch's removable handles are used, so accelerate's ``_hf_hook`` and wrapped ``forward`` stay intact. The one
exception: while a method keeps per-row decoding state (or refuses beam search), the model gets an instance
attribute ``_reorder_cache``, the hook transformers' beam search calls to reorder the cache; it reorders the
cache as before and tells the methods (`MethodState.reorder_beams`). ``remove()`` deletes it.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from torch import nn

from lvlm_steer.adapters import Adapter, adapter_for
from lvlm_steer.attention import LayerRoute, add_route, base_attention_fn, drop_route, ensure_registered
from lvlm_steer.compat import cache_from
from lvlm_steer.context import ForwardContext
from lvlm_steer.errors import ConflictError, MissingImagesError, SteeringError
from lvlm_steer.host import LegacyState, SteeringHost
from lvlm_steer.method import Method, MethodState
from lvlm_steer.model_info import ModelInfo
from lvlm_steer.registry import parse_spec
from lvlm_steer.stats import LayerTokens, PrefillStats
from lvlm_steer.stats import combine as combine_layer_tokens

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Steering] = weakref.WeakKeyDictionary()


def steer(model: nn.Module, *methods: Method | str, processor: Any = None) -> Steering:
    """Apply ``methods`` to ``model`` in place and return the handle that removes them.

    Methods may be objects (``ls.AblateHeads({14: [3]})``) or CLI specs (``"ablate:heads=14.3"``). Every
    method is validated against the model before anything is attached, so a bad setting leaves the model
    untouched. Use the handle as a context manager or call ``.remove()``.
    """
    if model in _ACTIVE:
        raise ConflictError(
            "this model is already steered by "
            f"{_ACTIVE[model].describe()}; call .remove() on that handle first, or pass all methods to one steer() call"
        )
    parsed = [parse_spec(m) if isinstance(m, str) else m for m in methods]
    resolved = [m for m in parsed if m is not None]
    for m in resolved:
        if not isinstance(m, Method):
            raise TypeError(f"steer() takes Method objects or spec strings, got {type(m).__name__}")
    adapter = adapter_for(model, processor)
    for m in resolved:
        m.validate(adapter.info)
    check_conflicts(resolved, adapter.info)
    steering = Steering(model, adapter, resolved, processor)
    steering._attach()
    return steering


def check_conflicts(methods: list[Method], info: ModelInfo) -> None:
    """Refuse two methods that edit the same head, the same layer's attention, or both drive generation."""
    drivers = [m for m in methods if m.drives_generation()]
    shapers = [m for m in methods if m.shapes_logits()]
    legacy_driver = next((m for m in drivers if m.is_legacy()), None)
    if legacy_driver is not None and shapers:
        raise ConflictError(
            f"{legacy_driver.spec()} runs its own generation loop without the logits chain, so "
            f"{', '.join(m.spec() for m in shapers)} would be skipped: steer them in separate calls"
        )
    owner: dict[Hashable, Method] = {}
    for m in methods:
        claims = set(m.claims(info)) | {("attention", layer) for layer in m.attention_layers(info)}
        if m.drives_generation():
            claims.add(("generate",))
        for claim in sorted(claims, key=repr):
            if claim in owner:
                raise ConflictError(
                    f"{owner[claim].spec()} and {m.spec()} both edit {_describe_claim(claim)}; "
                    "their order would change the result: drop one, or give them disjoint heads/layers"
                )
            owner[claim] = m


def _describe_claim(claim: Hashable) -> str:
    if isinstance(claim, tuple) and claim[:1] == ("head",):
        return f"head {claim[1]}.{claim[2]} (layer.head)"
    if isinstance(claim, tuple) and claim[:1] == ("attention",):
        return f"the attention of layer {claim[1]}"
    if claim == ("generate",):
        return "the generation loop"
    return repr(claim)


class Steering:
    """Handle of a steered model: a context manager with `remove()`, `generate()` and the live context."""

    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method], processor: Any = None):
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.states: list[MethodState] = []  # one per method, in order, while attached
        self.processor = processor
        self.info: ModelInfo = adapter.info
        self.context = ForwardContext(self.info)
        self._handles: list[Any] = []
        self._driving = 0  # > 0 while steered.generate drives the model
        self._beam_hook = False
        self._routed: list[nn.Module] = []
        self._original_impl: str | None = None
        self._removed = False
        self._paused = 0
        self._forward_params = inspect.signature(model.forward).parameters
        self._prefill_valid: torch.Tensor | None = None  # (B,) valid prompt tokens at the last prefill, for stats()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _attach(self) -> None:
        try:
            base = self.adapter.text_config._attn_implementation or "eager"
            name = ensure_registered(base)
            modules = self.adapter.attention_modules()
            editors: dict[int, list[MethodState]] = {}
            routes = [LayerRoute(base_attention_fn(base, m), self.context, [], self) for m in modules]
            for module, route in zip(modules, routes, strict=True):  # routes first: methods may subscribe to them
                add_route(module, route)
                self._routed.append(module)
            self._handles.append(self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
            host = SteeringHost(self)
            for m in self.methods:
                state = LegacyState(m, self) if m.is_legacy() else m.bind(host)
                if not isinstance(state, MethodState):
                    raise TypeError(f"{type(m).__name__}.bind() must return a MethodState, got {type(state).__name__}")
                self.states.append(state)
                for layer in m.attention_layers(self.info):
                    editors.setdefault(layer, []).append(state)
            for layer, route in enumerate(routes):
                route.editors = editors.get(layer, [])
            self._original_impl = base
            self.model.set_attn_implementation({self.adapter.text_config_key: name})
            self._install_beam_hook()
            _ACTIVE[self.model] = self
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Take every hook of ours off and restore the original attention implementation (idempotent)."""
        if self._removed:
            return
        self._removed = True
        try:
            for handle in reversed(self._handles):
                handle.remove()
        finally:
            self._handles.clear()
            self._remove_beam_hook()
            for module in self._routed:
                drop_route(module)
            self._routed.clear()
            if self._original_impl is not None:
                self.model.set_attn_implementation({self.adapter.text_config_key: self._original_impl})
            if _ACTIVE.get(self.model) is self:
                del _ACTIVE[self.model]
            states, self.states = self.states, []
            for state in reversed(states):
                state.close()

    @property
    def active(self) -> bool:
        return not self._removed

    @property
    def paused(self) -> bool:
        return self._paused > 0

    @property
    def generating(self) -> bool:
        """True while `generate` (this handle's, not the model's own) drives the model."""
        return self._driving > 0

    def state_of(self, method: Method) -> MethodState:
        """The per-model state of ``method`` (the very object passed to ``steer()``) in this steering."""
        for m, state in zip(self.methods, self.states, strict=False):
            if m is method:
                return state
        steered = ", ".join(m.spec() for m in self.methods) or "no method"
        raise KeyError(f"{method.spec()} is not attached by this steering (it steers {steered})")

    @contextlib.contextmanager
    def pause(self, stream_state: dict[str, Any] | None = None) -> Iterator[None]:
        """Run the model unedited inside the block (e.g. a text-only contrast stream, a discovery pass).

        Edits, head hooks and the per-forward context are all left alone while paused, and model-level state
        that a forward overwrites (Qwen2-VL's cached ``rope_deltas``) is restored afterwards, so an outer
        steered generation can continue where it was.
        """
        self._paused += 1
        try:
            with self.adapter.isolated_state(stream_state):
                yield
        finally:
            self._paused -= 1

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Steering({type(self.model).__name__}, [{self.describe()}], {state})"

    def describe(self) -> str:
        return ", ".join(m.spec() for m in self.methods) or "no method"

    # -- running -------------------------------------------------------------------------------------------
    def generate(self, **inputs: Any) -> Any:
        """``model.generate`` under the steering, with every method's logits processors chained in their
        declared order (after the user's ``logits_processor``); a method that drives generation (if any)
        runs its passes here."""
        if not self.active:
            raise RuntimeError("this steering was removed; call steer() again")
        self._check_beams(inputs)
        # raw inputs (PIL images per row, question texts) reach only a method that asks for them (CARVE)
        raw = {k: inputs.pop(k) for k in ("images", "questions") if k in inputs}
        pairs = list(zip(self.methods, self.states, strict=True))
        driver = next(((m, s) for m, s in pairs if m.drives_generation()), None)
        with self._driving_generation():
            chain = self._logits_chain(pairs, inputs)
            if driver is None:
                return self.model.generate(**inputs, **({"logits_processor": chain} if chain else {}))
            m, state = driver
            extra = raw if m.needs_raw_inputs else {}
            if isinstance(state, LegacyState):  # check_conflicts refused a chain beside an old-style driver
                if chain:
                    inputs["logits_processor"] = chain
                return m.generate(self, **inputs, **extra)
            return state.generate({**inputs, **extra}, chain)

    @contextlib.contextmanager
    def _driving_generation(self) -> Iterator[None]:
        self._driving += 1
        try:
            yield
        finally:
            self._driving -= 1

    def _logits_chain(self, pairs: list[tuple[Method, MethodState]], inputs: dict[str, Any]) -> Any:
        """The user's ``logits_processor`` followed by the methods' processors (by `Method.logits_order`)."""
        from transformers import LogitsProcessorList

        shaping = [(m.logits_order, i, s) for i, (m, s) in enumerate(pairs) if m.shapes_logits()]
        user = inputs.pop("logits_processor", None)
        chain = LogitsProcessorList(user or [])
        for _, _, state in sorted(shaping, key=lambda t: t[:2]):
            chain.extend(state.logits_processors(inputs))
        return chain if len(chain) or user is not None else None

    def _check_beams(self, inputs: dict[str, Any]) -> None:
        config = inputs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = inputs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if int(beams) > 1:
            self._refuse_beams()

    def _refuse_beams(self) -> None:
        refusing = [m.spec() for m in self.methods if not m.supports_beams()]
        if refusing:
            raise SteeringError(
                f"{', '.join(refusing)} cannot follow beam search (its per-row state does not move with the beams); "
                "generate with num_beams=1, or steer without it"
            )

    def _install_beam_hook(self) -> None:
        """Route beam search's cache reordering through us when a method keeps per-row decoding state or refuses
        beams (transformers calls ``model._reorder_cache(cache, beam_idx)`` when the model has one)."""
        moves = [s for s in self.states if type(s).reorder_beams is not MethodState.reorder_beams]
        if not moves and all(m.supports_beams() for m in self.methods):
            return
        own = getattr(self.model, "_reorder_cache", None)
        if "_reorder_cache" in vars(self.model):
            raise ConflictError("the model already has an instance attribute _reorder_cache; lvlm_steer needs it")

        def reorder(cache: Any, beam_idx: torch.Tensor) -> Any:
            if not self.paused:
                self._refuse_beams()
                for state in moves:
                    state.reorder_beams(beam_idx)
            if own is not None:
                return own(cache, beam_idx)
            cache.reorder_cache(beam_idx)
            return cache

        self.model._reorder_cache = reorder
        self._beam_hook = True

    def _remove_beam_hook(self) -> None:
        if self._beam_hook:
            vars(self.model).pop("_reorder_cache", None)
            self._beam_hook = False

    def stats(self) -> PrefillStats:
        """Tokens and FLOPs (FastV Eq. 5) per text layer at the last prefill, with and without pruning."""
        if self._prefill_valid is None:
            raise RuntimeError("stats() needs a prefill first: run the steered model (forward or generate) once")
        reports = [r for s in self.states if (r := s.layer_tokens()) is not None]
        if reports:
            tokens = combine_layer_tokens(reports)
        else:
            valid = [int(n) for n in self._prefill_valid.tolist()]
            tokens = LayerTokens(valid, [list(valid) for _ in range(self.info.num_layers)])
        m = self.info.intermediate_size
        if m is None:
            raise RuntimeError(f"{self.info.architecture}'s text config has no intermediate_size; FLOPs are unknown")
        return PrefillStats.from_layer_tokens(tokens, self.info.hidden_size, int(m))

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.paused:
            return
        values = dict(zip(self._forward_params, args, strict=False)) | kwargs
        input_ids: torch.Tensor | None = values.get("input_ids")
        embeds: torch.Tensor | None = values.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else embeds
        if tokens is None:
            return
        past = cache_from(values)
        past_len = int(past.get_seq_length()) if past is not None else 0
        self.context.begin(
            image_mask=self.adapter.image_mask(input_ids) if input_ids is not None else None,
            attention_mask=values.get("attention_mask"),
            past_len=past_len,
            query_len=tokens.shape[1],
            batch_size=tokens.shape[0],
            device=tokens.device,
        )
        if self.context.phase == "prefill":
            self._check_steered_generate()
            self._prefill_valid = self.context.keys_valid_mask().sum(dim=1)
            self._check_images()
            try:
                for state in self.states:
                    state.reset()
                    state.prepare(values)
            except SteeringError:
                self.remove()  # never leave a half-prepared steering on the model
                raise

    def _check_steered_generate(self) -> None:
        if self.generating:
            return
        needing = [m.spec() for m in self.methods if m.needs_steered_generate()]
        if needing:
            raise SteeringError(
                f"{', '.join(needing)} runs part of its work in the steering's generate, which plain model.generate "
                "and model(...) skip: call steered.generate(**inputs, ...) on the handle that steer() returned "
                "(`with ls.steer(model, ...) as steered: steered.generate(**inputs)`)"
            )

    def _check_images(self) -> None:
        needing = [m.spec() for m in self.methods if m.requires_images()]
        if not needing:
            return
        if not self.context.image_positions_known:
            problem = "the forward got inputs_embeds only, so image positions are unknown; pass input_ids"
        elif rows := self.context.rows_without_images():
            problem = f"batch rows {rows} contain no image tokens; give every row an image"
        else:
            return
        self.remove()
        raise MissingImagesError(
            f"{', '.join(needing)} needs image tokens in every row: {problem}. "
            "The steering was removed; call steer() again with a valid batch."
        )
