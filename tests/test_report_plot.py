"""The report figure: fixed method order, intervals of changes against none, a legend outside the axes."""

from __future__ import annotations

import pytest

from lvlm_steer.evals.report_plot import difference_interval, method_rank, panel_points, plot


def test_methods_sort_in_one_fixed_order():
    labels = ["vtc_cls:keep=0.5", "pai", "zzz:x=1", "ablate:heads=1.2", "pai+vhr", "none", "carve"]
    assert sorted(labels, key=method_rank) == [
        "none",
        "ablate:heads=1.2",
        "pai",
        "carve",
        "vtc_cls:keep=0.5",
        "zzz:x=1",
        "pai+vhr",
    ]


def test_difference_interval_is_newcombes():
    lo, hi = difference_interval(0.5, 100, 0.5, 100)
    assert lo == pytest.approx(-hi) and hi == pytest.approx(0.1362, abs=2e-3)  # 2 x Wilson half-width / sqrt 2
    lo, hi = difference_interval(0.9, 400, 0.5, 400)
    assert 0.33 < lo < 0.4 < hi < 0.46


def _pope_rows():
    rows = []
    for method, acc in (("none", 0.80), ("pai", 0.81), ("carve", 0.50)):
        for split in ("random", "overall"):
            rows.append({"method": method, "split": split, "accuracy": acc, "f1": acc, "yes_ratio": 0.5, "n": 500})
    return rows


def test_panel_points_are_changes_against_none_with_intervals():
    points = panel_points(_pope_rows(), "accuracy", "n")
    assert {p["method"] for p in points} == {"pai", "carve"}  # none is the zero line, not a row
    pai = next(p for p in points if p["method"] == "pai")
    carve = next(p for p in points if p["method"] == "carve")
    assert pai["x"] == pytest.approx(1.0) and pai["interval"][0] < 0 < pai["interval"][1] and not pai["significant"]
    assert carve["x"] == pytest.approx(-30.0) and carve["interval"][1] < 0 and carve["significant"]
    assert all(p["interval"] is None and not p["significant"] for p in panel_points(_pope_rows(), "f1", None))


def test_panel_points_without_none_are_values():
    rows = [r for r in _pope_rows() if r["method"] != "none"]
    pai = next(p for p in panel_points(rows, "accuracy", "n") if p["method"] == "pai")
    assert pai["x"] == pytest.approx(81.0) and pai["interval"][0] < 81 < pai["interval"][1]


def test_plot_keeps_the_legend_outside_every_axes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    chair = [
        {"method": m, "split": "-", "chair_s": s, "chair_i": i, "recall": 0.7, "n": 200, "n_mentions": 600}
        for m, s, i in (("none", 0.4, 0.2), ("vhr", 0.35, 0.15))
    ]
    report = {
        "runs": [
            {"run": "runs/pope", "task": "pope", "model": "m", "rows": _pope_rows()},
            {"run": "runs/chair", "task": "chair", "model": "m", "rows": chair},
        ]
    }
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    plot(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    axes = fig.get_axes()
    assert len(axes) == 6  # one panel per metric, per run
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in axes)
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    assert labels == ["pai", "vhr", "carve"]  # the fixed order, the same rows in every panel
    plt.close("all")
