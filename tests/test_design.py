"""Design rules that code review would otherwise have to catch."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_methods_never_branch_on_architecture():
    """Code in hooks/ asks the adapter; it never tests model_type or the model's class."""
    for path in (ROOT / "hooks").glob("*.py"):
        text = path.read_text()
        assert "model_type" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                assert "Model" not in ast.unparse(node.args[1]), (path, ast.unparse(node))


def test_a_method_never_imports_another_method():
    for path in (ROOT / "hooks").glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lvlm_steer.hooks"):
                raise AssertionError(f"{path.name} imports {node.module}")
