"""The collapse guard: a model that predicts (nearly) one class on clean held-out data, or falls
below a clean-accuracy bound, is not a cleaned model and is never exported as one."""

from __future__ import annotations


class CollapseError(RuntimeError):
    """A phase of a run left its model collapsed or below its accuracy bound."""


def collapse_reason(report: dict, max_class_share: float | None = 0.95, min_cacc: float | None = None) -> str | None:
    """Why ``report`` (from ``mitigate.inference.clean_report``) shows a collapsed model, or None:
    one class predicted for at least ``max_class_share`` of the samples (None: not checked), or
    an accuracy below ``min_cacc`` (%, None: not checked)."""
    top = max(range(len(report["shares"])), key=report["shares"].__getitem__)
    if max_class_share is not None and report["shares"][top] >= max_class_share:
        return f"it predicts class {top} for {100 * report['shares'][top]:.1f}% of the {report['n']} clean held-out samples"
    if min_cacc is not None and report["cacc"] < min_cacc:
        return f"its clean held-out accuracy {report['cacc']:.2f} is below the bound {min_cacc:.2f}"
    return None
