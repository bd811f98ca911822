"""Models dispatched by accelerate (device_map, a layer offloaded to disk) steer; accelerate's hooks stay."""

from __future__ import annotations

import pytest
import torch
from conftest import _model, batch, logits

import lvlm_steer as ls
from lvlm_steer.compat import load_kwargs


def _hf_hooks(model) -> dict[str, str]:
    return {name: type(m._hf_hook).__name__ for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


def _map_with_layer_on_disk(model, layers_path: str, layer: int) -> dict[str, str]:
    """Every module on the CPU except one decoder layer on disk (written out fully: a {"": "cpu", ...} map
    with a disk entry fails to load in transformers 5.23)."""
    device_map: dict[str, str] = {}
    prefix, module = "", model
    for part in layers_path.split("."):
        for name, _ in module.named_children():
            if name != part:
                device_map[prefix + name] = "cpu"
        prefix, module = prefix + part + ".", getattr(module, part)
    for i in range(len(module)):
        device_map[f"{prefix}{i}"] = "disk" if i == layer else "cpu"
    return device_map


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_disk_offloaded_model(arch, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = _model(arch)
    model.save_pretrained(tmp_path / "model")
    device_map = _map_with_layer_on_disk(model, ls.adapter_for(model).layers_path, layer=1)
    dispatched = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model",
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        dtype=torch.float32,
        **load_kwargs(),
    ).eval()
    hooks_before = _hf_hooks(dispatched)
    assert hooks_before, "accelerate should have attached its hooks"

    inputs = batch(processor)
    ref = logits(model, inputs)
    plain = logits(dispatched, inputs)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)
    with ls.steer(dispatched, processor=processor):
        assert torch.equal(logits(dispatched, inputs), plain)
        assert _hf_hooks(dispatched) == hooks_before
    heads = {0: [1], 1: [2]}  # layer 1 lives on disk
    with ls.steer(dispatched, ls.AblateHeads(heads)):
        offloaded = logits(dispatched, inputs)
    with ls.steer(model, ls.AblateHeads(heads)):
        in_memory = logits(model, inputs)
    torch.testing.assert_close(offloaded, in_memory, atol=1e-5, rtol=1e-5)
    assert _hf_hooks(dispatched) == hooks_before
    assert torch.equal(logits(dispatched, inputs), plain)
