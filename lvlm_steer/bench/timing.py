"""Timing helpers: interleaved rounds with spreads, per-forward timestamps inside generate, peak memory.

On a shared machine the load changes between conditions, so every `bench` command runs its conditions
interleaved (one repeat of each per round, the order rotating: A B C, B C A, C A B, ...), after an untimed
warm-up of each. A ratio against the baseline is taken per round (both ran within the same minute) and reported
as the median of those per-round ratios with their range; it is marked unreliable when that range is wider than
the effect itself (|median ratio - 1|), or when there is only one round.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn


class ForwardTimer:
    """Time each top-level forward of ``model``: the first of a generate call is prefill, the rest decode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.durations: list[float] = []
        self._start = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardTimer:
        self._handles = [
            self.model.register_forward_pre_hook(self._pre),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.durations.append(time.perf_counter() - self._start)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak-since-reset (VmHWM) resident memory from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


T = TypeVar("T")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of one round: ``names`` rotated by the round index (A B C, B C A, C A B, ...)."""
    if not names:
        return []
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


def interleaved(
    names: Sequence[str],
    rounds: int,
    run: Callable[[str], T],
    warmup: bool = True,
    progress: Callable[[str, int, T], None] | None = None,
) -> dict[str, list[T]]:
    """Run each condition once per round, rounds interleaved (see the module docstring); results per condition.

    ``run(name)`` does one repeat of a condition and returns its measurement. With ``warmup`` every condition
    first runs once untimed (imports, allocator pools, caches). ``progress(name, round, result)`` is called after
    each timed repeat (round counts from 1).
    """
    if rounds < 1:
        raise ValueError(f"need at least one round, got {rounds}")
    if warmup:
        for name in names:
            run(name)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in round_order(names, r):
            result = run(name)
            results[name].append(result)
            if progress is not None:
                progress(name, r + 1, result)
    return results


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of one condition's repeats, and n."""
    values = list(values)
    if not values:
        nan = float("nan")
        return {"min": nan, "median": nan, "max": nan, "n": 0}
    return {"min": min(values), "median": median(values), "max": max(values), "n": len(values)}


def ratio_spread(values: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """``values / base`` per round: median, min, max, range, effect (|median - 1|) and whether it is unreliable.

    Unreliable: the per-round ratios spread over a wider range than the effect they are meant to show (so the
    ratio's sign or size is within the machine's noise), or there is only one round to judge from.
    """
    if len(values) != len(base):
        raise ValueError(f"per-round ratios need as many repeats as the baseline ({len(values)} vs {len(base)})")
    ratios = [v / b if b else float("nan") for v, b in zip(values, base, strict=True)]
    mid = median(ratios)
    lo, hi = (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))
    width, effect = hi - lo, abs(mid - 1)
    reason = None
    if len(ratios) < 2:
        reason = "one round: no spread to judge from"
    elif not width <= effect:  # also catches nan
        reason = f"per-round ratios span {width:.3f}, wider than the effect {effect:.3f}"
    return {
        "ratio": mid,
        "min": lo,
        "max": hi,
        "range": width,
        "effect": effect,
        "per_round": ratios,
        "unreliable": reason is not None,
        "why_unreliable": reason,
    }


def compare(samples: dict[str, list[dict[str, float]]], base: str, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per condition and metric: the spread of its repeats and, except for ``base``, its ratio to ``base``.

    ``samples[name]`` is that condition's list of per-round measurements (dicts holding ``metrics``), in round
    order, as `interleaved` returns them.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, rows in samples.items():
        entry: dict[str, Any] = {}
        for metric in metrics:
            values = [row[metric] for row in rows]
            entry[metric] = spread(values)
            if name != base:
                entry[metric]["vs_" + base] = ratio_spread(values, [row[metric] for row in samples[base]])
        out[name] = entry
    return out


def unreliable_ratios(comparison: dict[str, dict[str, Any]]) -> list[str]:
    """``condition.metric`` for every ratio in a `compare` result that is marked unreliable."""
    return [
        f"{name}.{metric}"
        for name, entry in comparison.items()
        for metric, stats in entry.items()
        for key, ratio in stats.items()
        if key.startswith("vs_") and ratio["unreliable"]
    ]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def environment() -> dict[str, Any]:
    """Versions and threads, stored beside every benchmark result so that figures can be compared."""
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
