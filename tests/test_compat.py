"""transformers version differences (lvlm_steer.compat), the flash route's name, and package isolation."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import _model, batch

import lvlm_steer as ls
from lvlm_steer import compat
from lvlm_steer.attention import base_attention_fn, ensure_registered
from lvlm_steer.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_without_cache_drops_the_cache_under_every_name():
    ids = torch.ones(1, 3, dtype=torch.long)
    kwargs = {"input_ids": ids, "cache": object(), "past_key_values": object(), "use_cache": True, "cache_position": 0}
    assert compat.without_cache(kwargs) == {"input_ids": ids}


@pytest.mark.parametrize("name", compat.CACHE_ARGUMENTS)
def test_cache_from_reads_either_name(name):
    cache = object()
    assert compat.cache_from({name: cache, "input_ids": None}) is cache
    assert compat.cache_from({"input_ids": None}) is None


def test_cache_kwargs_fill_the_cache_without_a_deprecation_warning():
    from transformers import DynamicCache

    model, processor = _model("llava")
    assert compat.cache_argument(model) in compat.CACHE_ARGUMENTS
    inputs = batch(processor)
    cache = DynamicCache()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(**inputs, **compat.cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_pai_text_stream_passes_its_cache_by_the_installed_name():
    model, processor = _model("llava")
    inputs = batch(processor)
    with warnings.catch_warnings(record=True) as caught, ls.steer(model, ls.PAI(cfg=True), processor=processor) as s:
        warnings.simplefilter("always")
        s.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_flash_route_is_selectable_without_running_it():
    """transformers >= 5.25 refuses set_attn_implementation names with "flash" or "a/b": ours has neither."""
    from transformers.utils.generic import is_flash_attention_requested

    model, _ = _model("llava")
    adapter = ls.adapter_for(model)
    name = ensure_registered("flash_attention_2")
    assert "flash" not in name and "/" not in name
    assert not is_flash_attention_requested(requested_attention_implementation=name)
    before = adapter.text_config._attn_implementation
    try:
        model.set_attn_implementation({adapter.text_config_key: name})
        assert adapter.text_config._attn_implementation == name
    finally:
        model.set_attn_implementation({adapter.text_config_key: before})
    assert adapter.text_config._attn_implementation == before


def test_flash_base_sees_its_own_name_on_the_config():
    """transformers' flash forward picks its kernel by module.config._attn_implementation: under our route it must
    read the base's name during the call, and ours again afterwards."""
    seen = []

    def fake_flash(module, query, key, value, attention_mask, **kwargs):
        seen.append(module.config._attn_implementation)
        return query.transpose(1, 2), None

    model, _ = _model("llava")
    module = ls.adapter_for(model).attention_modules()[0]
    config = module.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = compat.flash_route_name("flash_attention_2")
    try:
        wrapped = compat.as_implementation("flash_attention_2", fake_flash)
        q = torch.zeros(1, 2, 3, 4)
        out, _ = wrapped(module, q, q, q, None)
        assert seen == ["flash_attention_2"] and out.shape == (1, 3, 2, 4)
        assert config._attn_implementation == "lvlmsteer_fa2"
    finally:
        config._attn_implementation_internal = before
    assert base_attention_fn("sdpa", module).__name__ != "call"  # only flash bases are wrapped


def test_loading_passes_use_kernels_only_where_it_exists(tmp_path):
    from transformers import PreTrainedModel

    assert compat.load_kwargs() == ({"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {})
    model, processor = _model("llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    assert not getattr(loaded, "use_kernels", False)


# a version transformers does not use (a viable one would make transformers >= 5.25 import its kernel API from it)
FAKE_KERNELS = "FAKE = True\n__version__ = '0.0.1'\n"
CHECK_ISOLATION = """
import importlib, sys
first, expected = sys.argv[1], sys.argv[2]
mods = ["lvlm_steer.kernels", "kernels"] if first == "ours" else ["kernels", "lvlm_steer.kernels"]
loaded = {m: importlib.import_module(m) for m in mods}
ours, theirs = loaded["lvlm_steer.kernels"], loaded["kernels"]
if expected == "fake":
    assert getattr(theirs, "FAKE", False), theirs.__file__
else:
    assert theirs.__file__ == expected, theirs.__file__
assert callable(ours.grouped_attention) and ours.__file__ != theirs.__file__, ours.__file__
print(ours.__file__)
"""


@pytest.mark.parametrize("first", ["ours", "theirs"])
def test_a_top_level_kernels_package_and_ours_never_shadow_each_other(tmp_path, first):
    """Our kernels/ (lvlm_steer.kernels) and a top-level `kernels` (the Hugging Face package where installed, which
    transformers >= 5.25 imports; else a stand-in) each import as themselves, in either order."""
    real = importlib.util.find_spec("kernels")
    env = {"PATH": "/usr/bin:/bin"}
    if real is None:
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
        env["PYTHONPATH"] = str(tmp_path)
        expected = "fake"
    else:
        expected = real.origin
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_ISOLATION, first, expected],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).resolve().parent == (ROOT / "kernels").resolve()


def test_only_lvlm_steer_is_installed_top_level():
    tops = {name for name, dists in importlib.metadata.packages_distributions().items() if "lvlm-steer" in dists}
    assert tops <= {"lvlm_steer"} | {t for t in tops if t.startswith("__editable__")}, tops
    for name in ("kernels", "hooks", "evals"):  # our folders, installed only as lvlm_steer.<name>
        spec = importlib.util.find_spec(name)
        assert spec is None or Path(spec.origin or "").resolve().parent != (ROOT / name).resolve(), (name, spec)
