"""Timing helpers: per-forward timestamps inside generate (prefill vs decode) and peak memory."""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

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


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


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
