"""The method lifecycle: settings apart from per-model state, the host, the logits chain, steered.generate, beams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from conftest import _model, batch, logits

import lvlm_steer as ls
from lvlm_steer.context import ForwardContext
from lvlm_steer.host import SteeringHost
from lvlm_steer.method import Host, Method, MethodState
from lvlm_steer.testing import tiny_model

GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


# -- one settings object, several models ------------------------------------------------------------------------
def test_one_method_object_steers_two_models_at_once():
    model_a, processor = _model("llava")
    model_b, _ = tiny_model("llava", seed=1)
    inputs = batch(processor)
    with ls.steer(model_a, ls.FastV(k=1, r=0.5)):
        alone_a = logits(model_a, inputs)
    with ls.steer(model_b, ls.FastV(k=1, r=0.5)):
        alone_b = logits(model_b, inputs)
    shared = ls.FastV(k=1, r=0.5)
    with ls.steer(model_a, shared) as steered_a, ls.steer(model_b, shared) as steered_b:
        both_b = logits(model_b, inputs)
        both_a = logits(model_a, inputs)  # the old design: "no forward has started yet" (state bound to model b)
        assert steered_a.state_of(shared) is not steered_b.state_of(shared)
    assert torch.equal(both_a, alone_a) and torch.equal(both_b, alone_b)
    assert not torch.equal(alone_a, alone_b)


def test_a_method_object_is_reusable_after_remove():
    model, processor = _model("llava")
    inputs = batch(processor)
    method = ls.AblateHeads({1: [0, 1]}, mode="mean")
    with ls.steer(model, method):
        first = logits(model, inputs)
    with ls.steer(model, method) as steered:
        again = logits(model, inputs)
        state = steered.state_of(method)
    assert torch.equal(first, again)
    assert method == ls.AblateHeads({1: [0, 1]}, mode="mean")  # settings untouched by use
    with pytest.raises(KeyError, match="not attached by this steering"):
        steered.state_of(method)  # removal dropped the state
    assert state.sums  # the dropped state is the only holder of the running sums


def test_methods_see_a_host_without_the_handle():
    seen: list[Host] = []

    @dataclass
    class Probe(Method):
        name: ClassVar[str] = "test-probe"

        def bind(self, host: Host) -> MethodState:
            seen.append(host)
            return MethodState(self, host)

    model, _ = _model("llava")
    with ls.steer(model, Probe()):
        (host,) = seen
        assert isinstance(host, SteeringHost)
        assert not hasattr(host, "remove") and not hasattr(host, "methods")
        assert host.info.num_layers == ls.adapter_for(model).info.num_layers and not host.generating


# -- the logits chain and steered.generate ------------------------------------------------------------------------
CALLS: list[str] = []


class _Record:
    """A logits processor that logs its name and pushes its token up (so order and presence are visible)."""

    def __init__(self, label: str, token: int) -> None:
        self.label, self.token = label, token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        CALLS.append(self.label)
        scores = scores.clone()
        scores[:, self.token] = scores.max() + 10.0
        return scores


class _Shaping(MethodState):
    def logits_processors(self, inputs: dict[str, Any]) -> list[Any]:
        return [_Record(self.method.label, self.method.token)]


@dataclass
class Late(Method):
    name: ClassVar[str] = "test-late"
    logits_order: ClassVar[int] = 10
    label: str = "late"
    token: int = 5

    def shapes_logits(self) -> bool:
        return True

    def bind(self, host: Host) -> MethodState:
        return _Shaping(self, host)


@dataclass
class Early(Late):
    name: ClassVar[str] = "test-early"
    logits_order: ClassVar[int] = 0
    label: str = "early"
    token: int = 7


class _Driving(MethodState):
    runs = 0

    def generate(self, inputs: dict[str, Any], logits_processor: Any) -> Any:
        type(self).runs += 1
        return self.host.model.generate(**inputs, logits_processor=logits_processor)


@dataclass
class Driver(Method):
    """Drives generation only when ``on`` (ownership decided per instance, not per class)."""

    name: ClassVar[str] = "test-driver"
    on: bool = True

    def drives_generation(self) -> bool:
        return self.on

    def bind(self, host: Host) -> MethodState:
        return _Driving(self, host)


def test_logits_processors_chain_in_declared_order():
    model, processor = _model("llava")
    inputs = batch(processor)
    CALLS.clear()
    with torch.no_grad(), ls.steer(model, Late(), Early()) as steered:
        out = steered.generate(**inputs, **GREEDY)
    assert CALLS[:2] == ["early", "late"]  # order by logits_order, not by the order given to steer()
    assert (out[:, -3:] == 5).all()  # the last processor in the chain wins


def test_ownership_of_generation_is_per_instance():
    model, processor = _model("llava")
    inputs = batch(processor)
    with pytest.raises(ls.ConflictError, match="generation loop"):
        ls.steer(model, Driver(), Driver())
    _Driving.runs = 0
    CALLS.clear()
    with torch.no_grad(), ls.steer(model, Driver(on=False), Driver(), Early()) as steered:
        out = steered.generate(**inputs, **GREEDY)
    assert _Driving.runs == 1 and CALLS[:1] == ["early"]  # the driver got the chain
    assert (out[:, -3:] == 7).all()


@pytest.mark.parametrize("method", [Driver(), Early()], ids=["driver", "shaper"])
def test_plain_generate_and_forward_name_steered_generate(method):
    model, processor = _model("llava")
    inputs = batch(processor)
    with torch.no_grad(), ls.steer(model, method) as steered:
        with pytest.raises(ls.SteeringError, match=r"call steered\.generate\(\*\*inputs"):
            model.generate(**inputs, **GREEDY)
        with pytest.raises(ls.SteeringError, match=r"steered\.generate"):
            model(**inputs)
        steered.generate(**inputs, **GREEDY)  # and the handle works
        assert steered.active


def test_an_old_style_driver_refuses_a_chain_it_would_skip():
    @dataclass
    class OldDriver(Method):
        name: ClassVar[str] = "test-old-driver"

        def generate(self, steering, **inputs: Any) -> Any:
            return steering.model.generate(**inputs)

    model, _ = _model("llava")
    assert OldDriver().is_legacy() and OldDriver().drives_generation()
    assert not OldDriver().needs_steered_generate()  # old methods keep their behaviour until ported
    with pytest.raises(ls.ConflictError, match="would be skipped"):
        ls.steer(model, OldDriver(), Early())


# -- beam search -------------------------------------------------------------------------------------------------
BEAMS = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False, return_dict_in_generate=True)


def _beams(model, inputs, method, use_cache: bool):
    with torch.no_grad(), ls.steer(model, method):
        out = model.generate(**inputs, **BEAMS, output_scores=True, use_cache=use_cache)
    return out.sequences, out.sequences_scores


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("kind", ["mean", "zero", "scale"])
def test_head_methods_follow_beam_reordering(arch, kind):
    model, processor = _model(arch)
    inputs = batch(processor)
    heads = {layer: list(range(ls.adapter_for(model).info.num_heads)) for layer in (0, 1)}
    if kind == "scale":
        method = ls.ScaleHeads(heads, gain=1.5, where="text")
    else:
        method = ls.AblateHeads(heads, mode=kind, where="text")
    cached_seq, cached_scores = _beams(model, inputs, method, use_cache=True)
    ref_seq, ref_scores = _beams(model, inputs, method, use_cache=False)  # every step re-runs the whole sequence
    assert torch.equal(cached_seq, ref_seq)
    torch.testing.assert_close(cached_scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert "_reorder_cache" not in vars(model)


def test_a_method_that_cannot_follow_beams_is_refused():
    @dataclass
    class NoBeams(Method):
        name: ClassVar[str] = "test-no-beams"

        def supports_beams(self) -> bool:
            return False

        def bind(self, host: Host) -> MethodState:
            return MethodState(self, host)

    model, processor = _model("llava")
    inputs = batch(processor)
    with torch.no_grad(), ls.steer(model, NoBeams()) as steered:
        with pytest.raises(ls.SteeringError, match="cannot follow beam search.*num_beams=1"):
            model.generate(**inputs, **BEAMS)
        with pytest.raises(ls.SteeringError, match="cannot follow beam search"):
            steered.generate(**inputs, **BEAMS)
        steered.generate(**inputs, **GREEDY)  # greedy is fine
    assert "_reorder_cache" not in vars(model)


# -- the per-forward context -------------------------------------------------------------------------------------
def test_a_change_of_batch_size_starts_a_new_sequence():
    model, _ = _model("llava")
    ctx = ForwardContext(ls.adapter_for(model).info)
    image = torch.tensor([[False, True, True, False]] * 2)
    ctx.begin(image, None, past_len=0, query_len=4, batch_size=2, device=torch.device("cpu"))
    ctx.begin(None, None, past_len=4, query_len=1, batch_size=2, device=torch.device("cpu"))
    assert ctx.forwards == 1 and ctx.key_image_mask.shape == (2, 5)
    # the same cache length with 3 rows: another sequence (its layout was never seen), not a decode step of this one
    ctx.begin(None, None, past_len=5, query_len=1, batch_size=3, device=torch.device("cpu"))
    assert ctx.forwards == 0 and ctx.batch_size == 3 and ctx.key_image_mask.shape == (3, 6)
    assert not ctx.image_positions_known
