"""Attention capture as a core service: rows equal materialised (eager) probabilities, subscribers share one probe,
capture never takes an editor's slot (CARVE + VAR steer together), and it sees the attention PRE-edit at an edited
layer and POST-edit downstream of it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import _model, batch, logits

import lvlm_steer as ls
from lvlm_steer.attention import route_of
from lvlm_steer.capture import subscribe_attention
from lvlm_steer.method import Method
from lvlm_steer.testing import make_image

VAR_ON_LAYER_1 = dict(p=0.6, rho=0.3, tau=1.5, image_mass=0.05, sink_dims=(0, 1, 2, 3), start_layer=1, skip_last=True)
QUESTION = "What is in the image?"


@dataclass
class Listener(Method):
    """Test-only: subscribes to attention rows at attach and keeps what it was given."""

    name: ClassVar[str] = "listener"
    layers: tuple[int, ...] = (1, 2)
    rows: tuple = (-1, None)
    head_mean: bool = False
    columns: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.seen: list = []
        self.on = True

    def attach(self, steering) -> list:
        rows = slice(*self.rows)
        on = lambda: self.on  # noqa: E731
        return [subscribe_attention(steering, self.layers, self.seen.append, rows=rows, head_mean=self.head_mean,
                                    columns=self.columns, when=on)]  # fmt: skip


@contextlib.contextmanager
def eager_text(model):
    key = next(k for k in model.config.sub_configs if "text" in k)
    before = getattr(model.config, key)._attn_implementation
    model.set_attn_implementation({key: "eager"})
    try:
        yield
    finally:
        model.set_attn_implementation({key: before})


def eager_attentions(model, inputs) -> dict:
    """Per text layer, the attention weights its attention module returned (eager: materialised; None where an
    editor answered the call)."""
    weights = {}
    modules = ls.adapter_for(model).attention_modules()
    hooks = [
        m.register_forward_hook(lambda mod, a, out, i=i: weights.__setitem__(i, out[1])) for i, m in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return weights


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "gemma3"])
def test_rows_equal_eager_probabilities_per_head_and_head_mean(arch):
    model, processor = _model(arch)
    inputs = batch(processor)
    with eager_text(model):
        ref = eager_attentions(model, inputs)
    columns = torch.tensor([0, 3, 5])
    per_head, mean, cols = Listener(rows=(-3, None)), Listener(head_mean=True), Listener(columns=columns)
    with ls.steer(model, per_head, mean, cols) as steered:
        out = logits(model, inputs)
        routes = [route_of(m) for m in steered.adapter.attention_modules()]
        assert [len(r.observers) for r in routes] == [0, 1, 1], "one shared probe per subscribed layer"
    assert torch.equal(out, logits(model, inputs)), "capture never changes the output"
    assert [len(r.observers) for r in routes] == [0, 0, 0]
    q = inputs["input_ids"].shape[1]
    for layer, a, b, c in zip((1, 2), per_head.seen, mean.seen, cols.seen, strict=True):
        assert a.layer == b.layer == layer and a.rows == range(q - 3, q) and b.rows == range(q - 1, q)
        torch.testing.assert_close(a.probs, ref[layer][:, :, -3:].float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.probs, ref[layer][:, :, -1:].float().mean(1, keepdim=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.probs, ref[layer][:, :, -1:, columns].float(), atol=1e-5, rtol=1e-5)


def test_idle_subscription_costs_nothing_and_removal_is_clean():
    model, processor = _model("llava")
    inputs = batch(processor)
    listener = Listener()
    listener.on = False
    with ls.steer(model, listener) as steered:
        logits(model, inputs)
        assert listener.seen == []
        listener.on = True
        with steered.pause():
            logits(model, inputs)
        assert listener.seen == [], "paused forwards are not captured"
        logits(model, inputs)
        assert len(listener.seen) == 2
    with pytest.raises(ls.SteeringError, match="outside the text layers"):
        ls.steer(model, Listener(layers=(5,)))


def test_carve_and_var_compose_and_capture_sees_var_edited_attention():
    """CARVE captures layers 1-2 while VAR edits layer 1 (refused as a conflict before capture was a service).
    Layer 2: its inputs carry VAR's edit, and CARVE's rows equal the eager probabilities that layer 2 itself
    computed in the same steered forwards (and differ from the unsteered model's). Layer 1: the probe reads the
    probabilities before VAR's reweighting there (pre-edit), so at the first step they equal the unsteered ones."""
    model, processor = _model("llava")
    image = make_image(0)
    text = ls.testing.chat_prompt(processor, QUESTION)
    enc = dict(processor(images=[[image]], text=[text], return_tensors="pt"))
    with eager_text(model):
        plain = eager_attentions(model, enc)
        carve = ls.CARVE(layers=(1, 2), max_steps=4, capture_decode="sequential")
        with ls.steer(model, carve, ls.VAR(**VAR_ON_LAYER_1), processor=processor) as steered:
            attention = steered.adapter.attention_modules()
            seen: dict[int, list] = {1: [], 2: []}
            hooks = [attention[i].register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[1])) for i in (1, 2)]
            try:
                (run,), tiles = carve.capture(steered, image, [QUESTION])
            finally:
                for h in hooks:
                    h.remove()
    columns = torch.cat([t.positions.flatten() for t in tiles])
    assert run.steps == 4 and all(w is None for w in seen[1]), "VAR answers layer 1's calls itself"
    # forwards: the shared prefix, then one per step; the last step stops inside layer 2 (no output there)
    direct = torch.stack([w[0, :, -1, columns].mean(0) for w in seen[2][1:]]).float()
    assert direct.shape[0] == run.steps - 1
    torch.testing.assert_close(run.rows[:-1, 1], direct, atol=1e-5, rtol=1e-5)
    unsteered_2 = plain[2][0, :, -1, columns].mean(0).float()
    assert (run.rows[0, 1] - unsteered_2).abs().max() > 1e-4, "VAR must change what layer 2 sees"
    torch.testing.assert_close(run.rows[0, 0], plain[1][0, :, -1, columns].mean(0).float(), atol=1e-5, rtol=1e-5)
