"""Design rules that code review would otherwise have to catch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lvlm_steer.adapters.registry import supported_architectures

ROOT = Path(__file__).resolve().parents[1]
CONFIG_ATTRIBUTES = {"config", "text_config", "vision_config"}
# the model types our adapters know (the design rule: only adapters may name them)
MODEL_TYPES = set(supported_architectures()) | {"llava", "qwen2_vl", "qwen2_5_vl", "internvl", "smolvlm", "gemma3"}

# known violations: (file, kind) -> why; the test fails once one is fixed, so the entry must be deleted then
# (like a strict xfail). Empty: hooks/ branch on no architecture.
KNOWN: dict[tuple[str, str], str] = {}


def architecture_branches(source: str) -> set[str]:
    """The kinds of architecture knowledge in ``source`` (method code must ask the adapter instead):

    - ``hasattr``: probing a module or output for a feature (``hasattr(module, "q_norm")``);
    - ``config read``: ``.config`` / ``.text_config`` / ``.vision_config`` attributes, or getattr of them;
    - ``architecture list``: ``model_type``, or string constants naming model types (a list of supported ones);
    - ``isinstance on model classes``: isinstance against a transformers class or a ``*Model*``/``*Config*`` name.
    """
    tree = ast.parse(source)
    from_transformers = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers")
        for alias in node.names
    }
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "hasattr":
                found.add("hasattr")
            if node.func.id == "getattr" and len(node.args) > 1:
                attr = node.args[1]
                if isinstance(attr, ast.Constant) and attr.value in CONFIG_ATTRIBUTES:
                    found.add("config read")
            if node.func.id == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                if names & from_transformers or any(re.search("Model|Config|PreTrained", n) for n in names):
                    found.add("isinstance on model classes")
        elif isinstance(node, ast.Attribute):
            if node.attr in CONFIG_ATTRIBUTES:
                found.add("config read")
            if node.attr == "model_type":
                found.add("architecture list")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words = set(re.findall(r"[a-z0-9_]+", node.value.lower()))
            if "model_type" in words or words & MODEL_TYPES:
                found.add("architecture list")
    return found


SAMPLE = """
from transformers import LlavaForConditionalGeneration

SUPPORTED = ("llava", "qwen2_vl")


def project(module, hidden):
    if hasattr(module, "q_norm"):
        hidden = module.q_norm(hidden)
    return hidden


def window(model):
    return model.config.text_config.sliding_window


def is_llava(model):
    return isinstance(model, LlavaForConditionalGeneration)
"""


def test_the_rule_catches_each_kind_of_architecture_branching():
    assert architecture_branches(SAMPLE) == {
        "hasattr",
        "config read",
        "architecture list",
        "isinstance on model classes",
    }
    for kind, line in [
        ("hasattr", "x = hasattr(m, 'k_norm')"),
        ("config read", "w = getattr(cfg, 'text_config', None)"),
        ("config read", "w = steering.adapter.vision_config"),
        ("architecture list", "if info.architecture in ['gemma3', 'paligemma']: pass"),
        ("architecture list", "ok = model.config_type_is('x') or m.model_type"),
        ("isinstance on model classes", "ok = isinstance(m, transformers.Qwen2VLModel)"),
    ]:
        assert kind in architecture_branches(line), line
    clean = 'def f(host):\n    """Works on llava and qwen2_vl (docstrings may name them)."""\n    return host.info\n'
    assert architecture_branches(clean) == set()


def test_methods_never_branch_on_architecture():
    """Code in hooks/ asks the adapter; it never probes modules, reads configs, lists or tests architectures."""
    found = set()
    for path in sorted((ROOT / "hooks").glob("*.py")):
        found |= {(path.name, kind) for kind in architecture_branches(path.read_text())}
    assert found == set(KNOWN), (
        f"new architecture branching in hooks/: {sorted(found - set(KNOWN))} (ask the adapter instead); "
        f"fixed, so delete from KNOWN: {sorted(set(KNOWN) - found)}"
    )


def test_a_method_never_imports_another_method():
    for path in (ROOT / "hooks").glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lvlm_steer.hooks"):
                raise AssertionError(f"{path.name} imports {node.module}")


def test_core_edits_no_private_torch_or_transformers_attributes():
    """Hooks are ours only (removable handles); configs change through set_attn_implementation."""
    private = re.compile(r"\._(forward|backward)_(pre_)?hooks|_attn_implementation_internal|_output_capturing")
    # compat.py is the one place for transformers internals: its flash wrapper shows the flash forward the base's
    # name for the duration of a call (transformers picks the flash kernel from that private config field)
    allowed = {ROOT / "lvlm_steer" / "compat.py"}
    for path in sorted((ROOT / "lvlm_steer").rglob("*.py")):
        if path not in allowed:
            assert not private.search(path.read_text()), path
