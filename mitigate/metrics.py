"""CACC, ASR and the defenses' rates as torchmetrics (synced across DDP ranks by torchmetrics
itself)."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassF1Score


class TargetShare(Metric):
    """The model's own ASR floor: the share of the clean test samples whose label is not the
    attacker's target that the model already predicts as the target, that is, the ASR the
    poisoned test set would show without its trigger (it holds exactly these samples, each with
    the trigger inserted). The target is read off the poisoned samples' labels (a poisoned
    evaluation sample carries the target as its label). Counts are synced across ranks."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("counts", torch.zeros(num_classes, num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("target", torch.tensor(-1, dtype=torch.long), dist_reduce_fx="max")

    def update(self, preds: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor) -> None:
        """Count (label, prediction) of the clean samples; note the target from the poisoned ones."""
        clean = ~poisoned
        idx = labels[clean] * self.num_classes + preds[clean]
        self.counts += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, self.num_classes).double()
        if poisoned.any():
            self.target = torch.maximum(self.target, labels[poisoned].max())

    def compute(self) -> torch.Tensor:
        """The share (nan without a poisoned sample or a non-target clean one)."""
        t = int(self.target)
        if t < 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        others = [y for y in range(self.num_classes) if y != t]
        total = self.counts[others].sum()
        return self.counts[others, t].sum() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class BackdoorMetrics(torch.nn.Module):
    """CACC = accuracy on clean samples (and their macro-F1); ASR = share of poisoned samples predicted as the
    target label (poisoned evaluation samples carry the target as their label, so ASR is the
    accuracy on them); ``floor`` = the model's own ASR floor (``TargetShare``). Samples are
    routed by the batch's ``poisoned`` flag."""

    def __init__(self, num_classes: int, prefix: str) -> None:
        super().__init__()
        acc = lambda: MulticlassAccuracy(num_classes=num_classes, average="micro")  # noqa: E731
        # macro-F1 beside CACC: on an imbalanced task the majority class alone keeps CACC high
        self.cacc = MetricCollection({"cacc": acc(), "macro_f1": MulticlassF1Score(num_classes=num_classes, average="macro")},
                                     prefix=prefix)
        self.asr = MetricCollection({"asr": acc()}, prefix=prefix)
        self.floor = MetricCollection({"floor": TargetShare(num_classes)}, prefix=prefix)

    def update(self, preds: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor) -> None:
        """Route each prediction to CACC (clean) or ASR (poisoned), and count the floor."""
        clean = ~poisoned
        if clean.any():
            self.cacc.update(preds[clean], labels[clean])
        if poisoned.any():
            self.asr.update(preds[poisoned], labels[poisoned])
        self.floor.update(preds, labels, poisoned)

    def loggable(self) -> dict:
        """The metric objects that saw data, for ``LightningModule.log_dict`` (the floor once a
        poisoned sample told the target)."""
        out = dict(self.cacc.items()) if self.cacc["cacc"].update_called else {}
        if self.asr["asr"].update_called:
            out.update(self.asr.items())
            out.update(self.floor.items())
        return out


class Rate(Metric):
    """sum(hits) / count, summed over batches and DDP ranks; nan when nothing was counted (so
    every rank can call ``compute`` whatever data it saw)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hits", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, hits: torch.Tensor) -> None:
        """Add the 0/1 ``hits`` of a batch."""
        self.hits += hits.double().sum()
        self.count += hits.numel()

    def compute(self) -> torch.Tensor:
        """hits / count, synced across ranks (nan when nothing was counted)."""
        return self.hits / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class CorrectionMetrics(torch.nn.Module):
    """CACC and ASR of the predictions a defense made after correcting its inputs (IMBERT,
    ONION); ``extra`` names more rates the defense updates itself (e.g. top-K precision). As in
    ``BackdoorMetrics``, a poisoned sample carries the attacker's target as its label, so ASR is
    the accuracy on the poisoned samples: the defense itself never needs to know the target."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.rates = torch.nn.ModuleDict({k: Rate() for k in ("cacc", "asr", *extra)})

    def update(self, preds: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor) -> None:
        """CACC over the clean samples, ASR (predicted the target) over the poisoned ones."""
        self.rates["cacc"].update(preds[~poisoned] == labels[~poisoned])
        self.rates["asr"].update(preds[poisoned] == labels[poisoned])

    def compute(self) -> dict[str, torch.Tensor]:
        """Every rate, synced across ranks."""
        return {k: m.compute() for k, m in self.rates.items()}

    def reset(self) -> None:
        """Forget every batch."""
        for m in self.rates.values():
            m.reset()


class DetectionMetrics(torch.nn.Module):
    """FRR (clean samples flagged / clean), FAR (poisoned not flagged / poisoned) and the AUROC
    of the suspicion score (higher = more suspicious), over the samples given to ``update``."""

    def __init__(self) -> None:
        super().__init__()
        self.frr, self.far = Rate(), Rate()
        self.auroc = BinaryAUROC()

    def update(self, flagged: torch.Tensor, suspicion: torch.Tensor, poisoned: torch.Tensor) -> None:
        """Flag decisions and suspicion scores of a batch."""
        self.frr.update(flagged[~poisoned])
        self.far.update(~flagged[poisoned])
        if len(poisoned):
            # torchmetrics applies a sigmoid to any update whose scores leave [0, 1] and not to the
            # others, which mixes scales across batches: squash every score ourselves (monotone,
            # float64 so that close scores stay apart)
            self.auroc.update(torch.sigmoid(suspicion.double()), poisoned.long())

    def compute(self) -> dict[str, torch.Tensor]:
        """FRR, FAR and AUROC, synced across ranks (AUROC nan without both kinds of samples)."""
        out = {"frr": self.frr.compute(), "far": self.far.compute()}
        # both classes present (counts are synced, so every rank takes the same branch)
        both = self.frr.count > 0 and self.far.count > 0
        out["auroc"] = self.auroc.compute() if both else torch.tensor(float("nan"))
        return out

    def reset(self) -> None:
        """Forget every batch."""
        for m in (self.frr, self.far, self.auroc):
            m.reset()
