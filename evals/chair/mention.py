"""One object mention in a caption (shared by the official and the fixed extraction rules)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mention:
    """One object mention: the table form that matched, its COCO category, and the index of its first token."""

    word: str
    category: str
    index: int
