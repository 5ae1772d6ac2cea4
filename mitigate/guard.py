"""The collapse guard: a model that predicts (nearly) one class on clean held-out data, or falls
below a clean-accuracy bound, is not a cleaned model and is never exported as one."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mitigate.data.encoding import PadCollator


class CollapseError(RuntimeError):
    """A phase of a run left its model collapsed or below its accuracy bound."""


@torch.no_grad()
def clean_report(model, dataset, pad_id: int, batch_size: int = 128) -> dict:
    """Accuracy (%) and the share of each predicted class on a clean dataset (every sample,
    on every rank: the result is the same everywhere)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    loader = DataLoader([dataset[i] for i in order], batch_size=batch_size, collate_fn=PadCollator(pad_id))
    preds, labels = [], []
    for b in loader:
        out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        preds.append(out.logits.argmax(-1).cpu())
        labels.append(b["labels"])
    model.train(was_training)
    p, y = torch.cat(preds), torch.cat(labels)
    shares = torch.bincount(p, minlength=model.config.num_labels).double() / max(1, len(p))
    return {"cacc": round(100.0 * float((p == y).double().mean()), 2), "shares": [round(float(s), 4) for s in shares], "n": len(p)}


def collapse_reason(report: dict, max_class_share: float | None = 0.95, min_cacc: float | None = None) -> str | None:
    """Why ``report`` (from ``clean_report``) shows a collapsed model, or None."""
    top = max(range(len(report["shares"])), key=report["shares"].__getitem__)
    if max_class_share is not None and report["shares"][top] >= max_class_share:
        return f"it predicts class {top} for {100 * report['shares'][top]:.1f}% of the {report['n']} clean held-out samples"
    if min_cacc is not None and report["cacc"] < min_cacc:
        return f"its clean held-out accuracy {report['cacc']:.2f} is below the bound {min_cacc:.2f}"
    return None
