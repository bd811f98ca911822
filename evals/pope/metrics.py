"""POPE metrics: accuracy, precision, recall, F1 (positive class "yes"), yes ratio and unknown rate.

Convention for ``"unknown"`` predictions (answers a parser could not read): they are always wrong for accuracy and
are neither a yes nor a no for precision/recall. So an unknown on a "yes" question counts as a false negative
(the object was missed), while an unknown on a "no" question is not a false positive and not a true negative;
``tp + fp + tn + fn + (unknowns on "no" questions) == n``. All rates are fractions in [0, 1]; a ratio whose
denominator is zero is 0.0.

A parser may carry its peer's convention instead (`MetricConvention`): lmms-eval leaves unknowns on "yes" questions
out of recall (so ``fn`` counts only answers read as "no" there) and reports a yes ratio of labels, which we add as
``yes_ratio_labels`` beside our ``yes_ratio`` (predicted yes / n) rather than replace it.
"""

from __future__ import annotations

from collections.abc import Sequence

from .parse import DEFAULT_PARSER, OWN_CONVENTION, MetricConvention, get_parser

_PREDICTIONS = ("yes", "no", "unknown")


def pope_metrics(
    labels: Sequence[str], predictions: Sequence[str], convention: MetricConvention = OWN_CONVENTION
) -> dict:
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
    fn = pairs.count(("yes", "no"))
    if convention.unknown_on_yes == "miss":
        fn += pairs.count(("yes", "unknown"))
    unknown = sum(pred == "unknown" for pred in predictions)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    metrics = {
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
    if convention.label_yes_ratio:
        metrics["yes_ratio_labels"] = _ratio(sum(label == "yes" for label in labels), n)
    return metrics


def pope_report(records: Sequence[dict], parser: str = DEFAULT_PARSER) -> dict[str, dict]:
    """Metrics per split (in first-seen order) plus ``"overall"``, pooled over all records (not a mean of splits).

    Each record needs ``split``, ``label`` and ``prediction`` (already parsed, with ``parser``, whose peer's metric
    convention is used).
    """
    convention = get_parser(parser).convention
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
    report = {split: pope_metrics(labels, preds, convention) for split, (labels, preds) in by_split.items()}
    report["overall"] = pope_metrics(
        [r["label"] for r in records],
        [r["prediction"] for r in records],
        convention,
    )
    return report


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else 0.0
