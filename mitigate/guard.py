"""The collapse guard: a model that predicts (nearly) one class on clean held-out data, or falls
below a clean-accuracy bound, is not a cleaned model and is never exported as one.

The bound reads the report's ``metric``: accuracy on a balanced task, macro-F1 where one class
holds more than ``IMBALANCED`` of the clean held-out labels (there, predicting the majority class
everywhere keeps the accuracy high and the macro-F1 does not)."""

from __future__ import annotations

#: a task is judged by macro-F1 when one class holds more than this share of its clean labels
IMBALANCED = 0.6


class CollapseError(RuntimeError):
    """A phase of a run left its model collapsed or below its accuracy bound."""


def score(report: dict) -> float:
    """The number the bounds read (%): the report's ``metric`` (``cacc`` when it has none)."""
    return report[report.get("metric", "cacc")]


def metric_name(report: dict) -> str:
    """What ``score`` reads, in words."""
    return {"cacc": "accuracy", "macro_f1": "macro-F1"}.get(report.get("metric", "cacc"), report.get("metric", "cacc"))


def share_limit(report: dict, max_class_share: float) -> float:
    """The predicted share of a class from which the model is collapsed onto it: ``max_class_share``,
    or, for a class that holds most of the clean labels, halfway from its true share to 100%."""
    true = max(report.get("label_shares") or [0.0])
    return max(max_class_share, (1.0 + true) / 2.0)


def collapse_reason(report: dict, max_class_share: float | None = 0.95, min_cacc: float | None = None) -> str | None:
    """Why ``report`` (from ``mitigate.inference.clean_report``) shows a collapsed model, or None:
    one class predicted for at least ``share_limit`` of the samples (``max_class_share`` on a
    balanced task; None: not checked), or a ``score`` (accuracy, or macro-F1 on an imbalanced
    task) below ``min_cacc`` (%, None: not checked)."""
    top = max(range(len(report["shares"])), key=report["shares"].__getitem__)
    if max_class_share is not None and report["shares"][top] >= share_limit(report, max_class_share):
        return f"it predicts class {top} for {100 * report['shares'][top]:.1f}% of the {report['n']} clean held-out samples"
    if min_cacc is not None and score(report) < min_cacc:
        return f"its clean held-out {metric_name(report)} {score(report):.2f} is below the bound {min_cacc:.2f}"
    return None
