"""The shared benchmark timing logic (interleaved rounds, spreads, unreliable ratios), with fake timers."""

from __future__ import annotations

import math

import pytest

from lvlm_steer.bench.timing import compare, interleaved, ratio_spread, round_order, spread, unreliable_ratios


def test_round_order_rotates():
    names = ["a", "b", "c"]
    assert [round_order(names, r) for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_interleaved_warms_up_then_alternates_conditions():
    calls = []
    seen = []
    results = interleaved(
        ["a", "b"], 3, lambda name: calls.append(name) or len(calls), progress=lambda n, r, x: seen.append((n, r))
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert results == {"a": [3, 6, 7], "b": [4, 5, 8]}
    assert seen == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    with pytest.raises(ValueError, match="at least one round"):
        interleaved(["a"], 0, lambda name: 0)


class FakeMachine:
    """Each condition has a fixed cost; the machine's load (a slowdown factor) changes every ``period`` calls."""

    def __init__(self, costs: dict[str, float], loads: list[float], period: int) -> None:
        self.costs, self.loads, self.period, self.calls = costs, loads, period, 0

    def run(self, name: str) -> dict[str, float]:
        load = self.loads[min(self.calls // self.period, len(self.loads) - 1)]
        self.calls += 1
        return {"seconds": self.costs[name] * load}


def test_interleaving_cancels_a_load_change_that_back_to_back_runs_turn_into_a_ratio():
    costs = {"base": 1.0, "method": 1.2}
    loads = [1.0, 3.0, 3.0, 3.0]  # the machine gets 3x slower after the first two calls (the warm-up)
    machine = FakeMachine(costs, loads, period=2)
    samples = interleaved(list(costs), 3, machine.run)
    ratio = compare(samples, "base", ["seconds"])["method"]["seconds"]["vs_base"]
    assert ratio["ratio"] == pytest.approx(1.2) and ratio["range"] == pytest.approx(0) and not ratio["unreliable"]

    # the same machine, each condition's repeats back to back: the load change shows up as the ratio
    machine = FakeMachine(costs, [1.0, 1.0, 1.0, 3.0, 3.0, 3.0], period=1)
    back_to_back = {name: [machine.run(name) for _ in range(3)] for name in costs}
    wrong = compare(back_to_back, "base", ["seconds"])["method"]["seconds"]["vs_base"]
    assert wrong["ratio"] == pytest.approx(3.6)


def test_spread_and_ratio_spread():
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    assert math.isnan(spread([])["median"])
    noisy = ratio_spread([1.0, 1.3, 0.8], [1.0, 1.0, 1.0])
    assert noisy["ratio"] == pytest.approx(1.0) and noisy["range"] == pytest.approx(0.5)
    assert noisy["unreliable"] and "wider than the effect" in noisy["why_unreliable"]
    clear = ratio_spread([3.0, 3.2, 3.1], [2.0, 2.0, 2.0])
    assert clear["ratio"] == pytest.approx(1.55) and not clear["unreliable"] and clear["why_unreliable"] is None
    assert ratio_spread([2.0], [1.0])["unreliable"]  # one round cannot show its spread
    with pytest.raises(ValueError, match="as many repeats"):
        ratio_spread([1.0, 2.0], [1.0])


def test_compare_lists_the_unreliable_ratios():
    samples = {
        "base": [{"t": 1.0, "tps": 10.0}, {"t": 1.0, "tps": 10.0}],
        "x": [{"t": 2.0, "tps": 10.5}, {"t": 2.1, "tps": 9.0}],
    }
    result = compare(samples, "base", ["t", "tps"])
    assert "vs_base" not in result["base"]["t"]
    assert result["x"]["t"]["vs_base"]["ratio"] == pytest.approx(2.05)
    assert unreliable_ratios(result) == ["x.tps"]


def test_attention_worker_answers_runs_and_memory_line_by_line():
    """The protocol `bench attention` drives its per-condition workers with (in process, small variant)."""
    import io
    import json

    from conftest import require_reference

    from lvlm_steer.bench.attention import serve_condition

    require_reference("smolvlm-256m-instruct")
    out = io.StringIO()
    serve_condition("unwrapped", "small", 1, stdin=io.StringIO("run\nrun\nmemory\nquit\nrun\n"), stdout=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["ready"] == "unwrapped" and lines[0]["prompt_tokens"] > 64
    assert all(r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in lines[1:3])
    assert set(lines[3]) == {"extra_peak_rss_mib"} and len(lines) == 4  # nothing after quit
