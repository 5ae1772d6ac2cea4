"""CACC and ASR as torchmetrics (synced across DDP ranks by torchmetrics itself)."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy


class BackdoorMetrics(torch.nn.Module):
    """CACC = accuracy on clean samples; ASR = share of poisoned samples predicted as the
    target label. Poisoned evaluation samples carry the target as their label, so ASR is the
    accuracy on them. Samples are routed by the batch's ``poisoned`` flag."""

    def __init__(self, num_classes: int, prefix: str) -> None:
        super().__init__()
        acc = lambda: MulticlassAccuracy(num_classes=num_classes, average="micro")  # noqa: E731
        self.cacc = MetricCollection({"cacc": acc()}, prefix=prefix)
        self.asr = MetricCollection({"asr": acc()}, prefix=prefix)

    def update(self, preds: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor) -> None:
        clean = ~poisoned
        if clean.any():
            self.cacc.update(preds[clean], labels[clean])
        if poisoned.any():
            self.asr.update(preds[poisoned], labels[poisoned])

    def loggable(self) -> dict:
        """The metric objects that saw data, for ``LightningModule.log_dict``."""
        return {**(dict(self.cacc.items()) if self.cacc["cacc"].update_called else {}),
                **(dict(self.asr.items()) if self.asr["asr"].update_called else {})}
