"""``lvlm-steer report RUN...``: methods x metrics side by side (Markdown, JSON), with the change against ``none``,
and a figure of each metric's change against ``none`` (PNG, `report_plot`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lvlm_steer.evals.io import write_json_atomic
from lvlm_steer.evals.run_state import SUMMARY_FILE

POPE_COLUMNS = ("accuracy", "f1", "precision", "recall", "yes_ratio", "unknown_rate")
CHAIR_COLUMNS = ("chair_s", "chair_i", "recall", "mean_length")
# lower is better for these (so a negative change is an improvement)
LOWER_IS_BETTER = {"chair_s", "chair_i", "unknown_rate"}


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at small n and near 0 or 1, unlike p +- 1.96 SE)."""
    if not n:
        return 0.0, 0.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load_summary(run: str | Path) -> dict[str, Any]:
    path = Path(run) / SUMMARY_FILE if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} an eval output folder (lvlm-steer eval ... --out)?")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:  # a torn or hand-edited file
        raise ValueError(f"{path} is not valid JSON ({exc}); rerun the eval with the same --out to rewrite it") from exc


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, split) with the task's metric columns and their change against ``none``."""
    rows = []
    for method in summary["methods"]:
        metrics = summary["metrics"][method]
        if summary["task"] == "pope":
            for split, values in metrics.items():
                rows.append(
                    {
                        "task": "pope",
                        "split": split,
                        "method": method,
                        **{c: values.get(c) for c in POPE_COLUMNS},
                        "n": values.get("n"),
                        "accuracy_ci95": wilson_interval(values["accuracy"], values["n"]),
                    }
                )
                if "yes_ratio_labels" in values:  # lmms-eval's yes ratio (of labels), kept beside ours
                    rows[-1]["yes_ratio_labels"] = values["yes_ratio_labels"]
        else:
            rows.append(
                {
                    "task": "chair",
                    "split": "-",
                    "method": method,
                    **{c: metrics.get(c) for c in CHAIR_COLUMNS},
                    "n": metrics.get("n_captions"),
                    "n_mentions": metrics.get("n_mentions"),  # CHAIR_i's denominator, for its interval
                }
            )
    base = {(r["split"]): r for r in rows if r["method"] == "none"}
    columns = POPE_COLUMNS if summary["task"] == "pope" else CHAIR_COLUMNS
    for r in rows:
        ref = base.get(r["split"])
        r["delta"] = {c: (r[c] - ref[c]) if ref and r[c] is not None and ref[c] is not None else None for c in columns}
    return rows


def scoring(summary: dict[str, Any]) -> str:
    """How a run's answers were scored: the POPE parser, or the CHAIR mention rules (runs from before the
    ``--chair-rules`` option were scored with what is now ``fixed``)."""
    config = summary.get("config") or {}
    if summary["task"] == "pope":
        return f"parser {config.get('parser', 'pope')}"
    return f"CHAIR rules {config.get('chair_rules', 'fixed')}"


def build_report(runs: list[str | Path]) -> dict[str, Any]:
    report = {"runs": []}
    for run in runs:
        summary = load_summary(run)
        report["runs"].append(
            {
                "run": str(run),
                "task": summary["task"],
                "model": summary["model"],
                "data": summary.get("data"),
                "scoring": scoring(summary),
                "rows": table_rows(summary),
            }
        )
    return report


def to_markdown(report: dict[str, Any]) -> str:
    out = ["# lvlm-steer report", ""]
    for run in report["runs"]:
        columns = POPE_COLUMNS if run["task"] == "pope" else CHAIR_COLUMNS
        out += [f"## {run['task'].upper()}: {run['run']}", f"model: `{run['model']}`", ""]
        if run.get("scoring"):
            out[-1:] = [f"scoring: {run['scoring']}", ""]
        header = ["split", "method", *columns, "n"]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in run["rows"]:
            cells = [r["split"], f"`{r['method']}`"]
            for c in columns:
                cell = _cell(r[c], r["delta"][c], r["method"] == "none", c)
                if c == "accuracy" and "accuracy_ci95" in r:
                    lo, hi = r["accuracy_ci95"]
                    cell += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
                cells.append(cell)
            cells.append(str(r["n"]))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        "Values in parentheses: change against `none` (for chair_s, chair_i and unknown_rate lower is better). "
        "Brackets: 95% Wilson interval of the accuracy."
    )
    return "\n".join(out) + "\n"


def _cell(value, delta, is_base: bool, column: str) -> str:
    if value is None:
        return "-"
    scale = 1 if column == "mean_length" else 100
    text = f"{value * scale:.1f}" if column != "mean_length" else f"{value:.1f}"
    if not is_base and delta is not None:
        text += f" ({delta * scale:+.1f})"
    return text


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: each method's change against ``none`` with its interval (see ``report_plot``)."""
    from lvlm_steer.evals.report_plot import plot as plot_changes

    plot_changes(report, path)


def write_report(runs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.json and report.png to ``out_dir``; return their paths."""
    if not runs:
        raise ValueError("give at least one run folder")
    out_dir = Path(out_dir)
    report = build_report(runs)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json", "png": out_dir / "report.png"}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["markdown"].write_text(to_markdown(report))
    write_json_atomic(paths["json"], report)
    plot(report, paths["png"])
    return paths
