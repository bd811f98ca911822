"""Keep a source checkout's root off ``sys.path``.

The checkout holds ``kernels/``, ``hooks/`` and ``evals/``, installed only as ``lvlm_steer.*``. A process started in
the checkout's root (``python -m lvlm_steer.cli``, ``python -c``, ``python -m pytest``) has that root on ``sys.path``,
where those folders pass for top-level packages: ``kernels/`` then stands in for the Hugging Face ``kernels``
package that transformers >= 5.25 imports, and the import fails. Imported first by ``lvlm_steer``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_OUR_FOLDERS = ("kernels", "hooks", "evals")


def drop_checkout_root() -> None:
    """Remove the checkout root from ``sys.path`` and forget any of our folders imported as top-level packages."""
    if not (_ROOT / "lvlm_steer").is_dir() or not (_ROOT / "kernels").is_dir():
        return  # an installed copy (site-packages): nothing shadows anything
    sys.path[:] = [p for p in sys.path if _resolve(p) != _ROOT]
    for name in _OUR_FOLDERS:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin and Path(origin).resolve().parent == _ROOT / name:
            del sys.modules[name]


def _resolve(entry: str) -> Path | None:
    try:
        return Path(entry or ".").resolve()
    except OSError:
        return None
