"""POPE metrics: accuracy, precision, recall, F1 (positive class "yes"), yes ratio and unknown rate.

Convention for ``"unknown"`` predictions (answers a parser could not read): they are always wrong for accuracy and
are neither a yes nor a no for precision/recall. So an unknown on a "yes" question counts as a false negative
(the object was missed), while an unknown on a "no" question is not a false positive and not a true negative;
``tp + fp + tn + fn + (unknowns on "no" questions) == n``. All rates are fractions in [0, 1]; a ratio whose
denominator is zero is 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence

_PREDICTIONS = ("yes", "no", "unknown")


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict:
    """Metrics for parallel lists of labels ("yes"/"no") and parsed predictions ("yes"/"no"/"unknown")."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions; pass one prediction per question")
    for i, (label, pred) in enumerate(zip(labels, predictions, strict=True)):
        if label not in ("yes", "no"):
            raise ValueError(f"label {i} is {label!r}; labels must be 'yes' or 'no' (load them with load_questions)")
        if pred not in _PREDICTIONS:
            raise ValueError(f"prediction {i} is {pred!r}; parse raw answers first with parse_answer()")
    pairs = list(zip(labels, predictions, strict=True))
    n = len(pairs)
    tp = pairs.count(("yes", "yes"))
    fp = pairs.count(("no", "yes"))
    tn = pairs.count(("no", "no"))
    fn = pairs.count(("yes", "no")) + pairs.count(("yes", "unknown"))
    unknown = sum(pred == "unknown" for pred in predictions)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "unknown_rate": _ratio(unknown, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unknown": unknown,
        "n": n,
    }


def pope_report(records: Sequence[dict]) -> dict[str, dict]:
    """Metrics per split (in first-seen order) plus ``"overall"``, pooled over all records (not a mean of splits).

    Each record needs ``split``, ``label`` and ``prediction`` (already parsed).
    """
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    for i, record in enumerate(records):
        missing = [key for key in ("split", "label", "prediction") if key not in record]
        if missing:
            raise ValueError(f"record {i} lacks {missing}; each record needs split, label and prediction")
        if record["split"] == "overall":
            raise ValueError(f"record {i} has split 'overall', which is reserved for the pooled metrics")
        labels, preds = by_split.setdefault(str(record["split"]), ([], []))
        labels.append(record["label"])
        preds.append(record["prediction"])
    report = {split: pope_metrics(labels, preds) for split, (labels, preds) in by_split.items()}
    report["overall"] = pope_metrics(
        [r["label"] for r in records],
        [r["prediction"] for r in records],
    )
    return report


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0
