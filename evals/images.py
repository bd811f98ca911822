"""Opening eval images, with a clear error for a missing, empty, corrupt, truncated or oversized (bomb) file.

`image_problem` is the cheap check done before the model loads (it reads only the header, so it finds empty,
non-image and decompression-bomb files); `open_rgb` decodes, and so also finds truncated files during the run.
Both name the file, so a caller can stop with that message or skip the item and count it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lvlm_steer.errors import SteeringError

SKIP_HINT = "pass --skip-missing to leave such items out (they are counted in the summary)"


class UnreadableImageError(SteeringError, ValueError):
    """An image file exists but cannot be decoded (empty, corrupt, truncated, or too large to be safe)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"image {path} cannot be read ({reason}); replace the file, or {SKIP_HINT}")


def _reason(exc: BaseException) -> str:
    from PIL import Image

    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def image_problem(path: Path) -> str | None:
    """None when ``path`` opens as an image; else ``"missing"`` or a reason it is unreadable (header only)."""
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.size  # noqa: B018 - opening reads the header; the bomb check runs on the size
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, bomb)
        return _reason(exc)
    return None


def open_rgb(path: str | Path):
    """The decoded image in RGB, or `UnreadableImageError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise UnreadableImageError(path, _reason(exc)) from exc
