"""The one grammar for sets of layers (and other small index sets) in specs: ``1,18-31``.

Commas separate items, a dash gives an inclusive range. ``+`` is never part of a set, because eval joins
methods with it (``--method "vhr:layers=1,18-31+fastv"``); a set written with ``+`` gets an error naming
the comma form. `format_layer_set` is the inverse of `parse_layer_set`, so a method's spec round-trips.
"""

from __future__ import annotations

from collections.abc import Iterable


def parse_layer_set(text: str, what: str = "layer") -> tuple[int, ...]:
    """``"1,18-31"`` -> ``(1, 18, 19, ..., 31)``: sorted, without repeats; ranges are inclusive."""
    if "+" in text:
        raise ValueError(f"write {what}s with commas, not '+' ('+' joins methods): {text.replace('+', ',')!r}")
    values: set[int] = set()
    for piece in text.replace(" ", "").split(","):
        if not piece:
            continue
        first, dash, last = piece.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"expected a {what} or an inclusive range such as 1,18-31, got {piece!r}")
        stop = int(last) if dash else int(first)
        if stop < int(first):
            raise ValueError(f"range {piece!r} runs backwards; write low-high")
        values.update(range(int(first), stop + 1))
    return tuple(sorted(values))


def format_layer_set(values: Iterable[int]) -> str:
    """Inverse of `parse_layer_set`: consecutive values become ranges (``1,18-31``)."""
    runs: list[list[int]] = []
    for value in sorted(set(int(v) for v in values)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
