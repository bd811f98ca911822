"""The report's figure: per run, one panel per metric showing each method's change against ``none``.

Rows are methods in one fixed order (every panel and run alike, so a method sits on the same row everywhere),
x is the change in points with its 95% interval (Newcombe's score interval for a difference of two proportions,
built from the Wilson intervals of each), a line marks no change. A filled marker is a change whose interval
excludes 0; a hollow one has 0 within the interval. Metrics without a sampling interval (F1, CHAIR recall) show
their change alone, half-filled, and say so in the panel title. POPE splits are separate markers, keyed in a
legend above the panels, outside the axes. Without a ``none`` run, the panels show the values themselves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# head edits, attention edits, multi-pass methods, pruning (the README's table); unknown methods follow by name
METHOD_ORDER = ("ablate", "scale", "pai", "var", "act", "vhr", "carve", "fastv", "vtc_cls")
POPE_PANELS = (("accuracy", "accuracy", "n"), ("f1", "F1", None), ("yes_ratio", "yes-ratio", "n"))
CHAIR_PANELS = (("chair_s", "CHAIR_s", "n"), ("chair_i", "CHAIR_i", "n_mentions"), ("recall", "recall", None))
LOWER_IS_BETTER = {"chair_s", "chair_i"}
SPLIT_MARKERS = ("o", "s", "D", "^", "v", "P")


def method_rank(label: str) -> tuple[int, int, str]:
    """Sort key: ``none`` first, then single methods in METHOD_ORDER, then combinations (``a+b``), then by label."""
    if label == "none":
        return (0, 0, label)
    parts = [p.split(":", 1)[0] for p in label.split("+")]
    known = [METHOD_ORDER.index(p) if p in METHOD_ORDER else len(METHOD_ORDER) for p in parts]
    return (1 if len(parts) == 1 else 2, min(known), label)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(p1: float, n1: int, p0: float, n0: int) -> tuple[float, float]:
    """95% interval of p1 - p0 (independent samples), Newcombe's hybrid score method."""
    l1, u1 = wilson(p1, n1)
    l0, u0 = wilson(p0, n0)
    d = p1 - p0
    return d - math.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)


def panel_points(rows: list[dict[str, Any]], metric: str, n_key: str | None) -> list[dict[str, Any]]:
    """One point per (method, split) other than ``none``: change (or value) in points, interval, significance."""
    base = {r["split"]: r for r in rows if r["method"] == "none"}
    points = []
    for r in rows:
        value = r.get(metric)
        if value is None or (base and r["method"] == "none"):
            continue
        ref = base.get(r["split"])
        n = r.get(n_key) if n_key else None
        interval = None
        if ref is not None and ref.get(metric) is not None:
            centre = value - ref[metric]
            n0 = ref.get(n_key) if n_key else None
            if n and n0:
                interval = difference_interval(value, int(n), ref[metric], int(n0))
        elif base:
            continue  # a split without its baseline
        else:
            centre = value
            if n:
                interval = wilson(value, int(n))
        significant = interval is not None and ref is not None and (interval[0] > 0 or interval[1] < 0)
        points.append(
            {
                "method": r["method"],
                "split": r["split"],
                "x": 100 * centre,
                "interval": None if interval is None else (100 * interval[0], 100 * interval[1]),
                "significant": significant,
            }
        )
    return points


def _direction(metric: str) -> str:
    if metric in LOWER_IS_BETTER:
        return "; lower is better"
    return "" if metric == "yes_ratio" else "; higher is better"


def _draw_panel(ax, points, shown, style, splits) -> None:
    keys = sorted({p["split"] for p in points}, key=lambda s: splits.index(s) if s in splits else -1)
    step = min(0.18, 0.6 / max(1, len(keys)))
    offsets = {s: (i - (len(keys) - 1) / 2) * step for i, s in enumerate(keys)}
    for p in points:
        y = shown.index(p["method"]) + offsets[p["split"]]
        colour, marker = style[p["split"]]
        if p["interval"] is not None:
            ax.plot(list(p["interval"]), [y, y], color=colour, lw=1.2, solid_capstyle="butt")
        if p["interval"] is None:  # half-filled: there is no interval to judge by
            ax.plot(p["x"], y, marker=marker, ms=5.5, color=colour, fillstyle="bottom", mfcalt="white", ls="none")
            continue
        face = colour if p["significant"] else "white"
        ax.plot(p["x"], y, marker=marker, ms=5.5, color=colour, mfc=face, mew=1.2, ls="none")
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)


def plot(report: dict[str, Any], path: Path) -> None:
    """Write the figure for ``report`` (as `report.build_report` returns it) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = report["runs"]
    methods = sorted({r["method"] for run in runs for r in run["rows"]}, key=method_rank)
    has_base = [any(r["method"] == "none" for r in run["rows"]) for run in runs]
    shown = [m for m in methods if m != "none" or not all(has_base)]
    splits = list(dict.fromkeys(r["split"] for run in runs for r in run["rows"]))
    pope_splits = [s for s in splits if s != "-"]
    style = {s: (f"C{i % 10}", SPLIT_MARKERS[i % len(SPLIT_MARKERS)]) for i, s in enumerate(pope_splits)}
    style["-"] = ("0.15", "o")  # CHAIR: one value per method
    height = 1.5 + 0.3 * max(1, len(shown))
    fig = plt.figure(figsize=(13, height * len(runs) + 0.5), layout="constrained")
    subfigs = fig.subfigures(len(runs), 1, squeeze=False)[:, 0]
    for subfig, run, base_known in zip(subfigs, runs, has_base, strict=True):
        axes = subfig.subplots(1, 3, sharey=True)
        panels = POPE_PANELS if run["task"] == "pope" else CHAIR_PANELS
        base_rows = [r for r in run["rows"] if r["method"] == "none"]
        for ax, (metric, title, n_key) in zip(axes, panels, strict=True):
            _draw_panel(ax, panel_points(run["rows"], metric, n_key), shown, style, splits)
            note = "" if n_key else " (no interval)"
            if base_known:
                ax.axvline(0, color="0.3", lw=0.8)
                ax.set_xlabel(f"change vs none (points{_direction(metric)})", fontsize=8)
                refs = " / ".join(f"{100 * r[metric]:.1f}" for r in base_rows if r.get(metric) is not None)
                ax.set_title(f"{title}{note}\nnone: {refs}", fontsize=9)
            else:
                ax.set_xlabel("value (%)", fontsize=8)
                ax.set_title(f"{title}{note}", fontsize=9)
        axes[0].set_yticks(range(len(shown)), shown, fontsize=8)
        keys = [r["split"] for r in base_rows] or list(dict.fromkeys(r["split"] for r in run["rows"]))
        order = f"  (none's values in order: {' / '.join(keys)})" if base_known and len(keys) > 1 else ""
        subfig.suptitle(
            f"{run['task'].upper()}: {Path(run['run']).name} ({run['model']}){order}", fontsize=10, x=0.01, ha="left"
        )
    handles = [
        Line2D([], [], color=c, marker=m, ls="-", lw=1.2, ms=5.5, label=s if s != "-" else "CHAIR")
        for s, (c, m) in style.items()
        if s in splits
    ]
    handles += [
        Line2D([], [], color="0.3", marker="o", ls="none", ms=5.5, label="interval excludes 0"),
        Line2D([], [], color="0.3", marker="o", mfc="white", ls="none", ms=5.5, label="0 within interval"),
        Line2D(
            [], [], color="0.3", marker="o", fillstyle="bottom", mfcalt="white", ls="none", ms=5.5, label="no interval"
        ),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
