"""Supervised training of a sequence classifier: poisoned training (the attack, when the data
module trains on the poisoned mix) and clean fine-tuning (BERT-CFT: the same objective on the
defender's clean subset, starting from the suspicious checkpoint)."""

from __future__ import annotations

import math
import os
from typing import Literal

import lightning.pytorch as pl
import torch

from mitigate.metrics import BackdoorMetrics
from mitigate.models.loading import load_classifier


def seed_step(module: pl.LightningModule) -> None:
    """Dropout masks as a function of (seed, step, rank): a run resumed mid-epoch draws the
    same masks as an uninterrupted one."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    torch.manual_seed((seed * 1_000_003 + module.global_step) * 64 + module.global_rank)


class LinearDecay:
    """Learning-rate factor at optimizer step ``step``: linear warm-up over the first
    ``ceil(warmup_ratio * total)`` steps, then linear decay to 0 at step ``total``.

    ``total`` is set when training starts (``on_train_start``), not in ``configure_optimizers``:
    reading ``trainer.estimated_stepping_batches`` there sets the train loader up before a
    checkpoint is restored, and Lightning then never gives the loader its saved position
    (Lightning issue #20550): a run resumed mid-epoch would train the epoch's first batches
    twice and never see its last ones. The factor of step 0 does not depend on ``total``
    (1 without warm-up, 0 with), so the scheduler can be built before ``total`` is known.
    Plain attributes only: LambdaLR saves them in the checkpoint."""

    def __init__(self, warmup_ratio: float = 0.0) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.warmup_ratio = warmup_ratio
        self.total: int | None = None

    def __call__(self, step: int) -> float:
        if self.total is None:
            if step > 0:
                raise RuntimeError("LinearDecay: the schedule's length was never set (set .total in on_train_start)")
            return 0.0 if self.warmup_ratio > 0 else 1.0
        total = max(1, self.total)
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with ``LinearDecay``; its length is set with ``set_schedule_length``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearDecay(warmup_ratio))


def set_schedule_length(scheduler, total_steps: int) -> None:
    """Give a ``linear_schedule`` its number of steps (no-op for other schedulers)."""
    for fn in getattr(scheduler, "lr_lambdas", []):
        if isinstance(fn, LinearDecay):
            fn.total = int(total_steps)


class TextClassifier(pl.LightningModule):
    #: attention kernel to load the model with (None: the library's default; subclasses that
    #: differentiate twice or read attention probabilities set "eager")
    attn_implementation: str | None = None

    """Cross-entropy fine-tuning of any Hugging Face sequence classifier.

    Args:
        model: hub id or local folder (safetensors) of the classifier or encoder to start from.
        num_labels: number of classes (the CLI links it to the data).
        lr, weight_decay: AdamW settings (papers: 2e-5, 0).
        schedule: ``constant`` learning rate or ``linear`` decay after ``warmup_ratio`` warm-up.
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        num_labels: int = 2,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        warmup_ratio: float = 0.0,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # from_pretrained returns the model in eval mode and Lightning keeps module modes as
        # they are: switch dropout on for training.
        self.model = load_classifier(
            model, num_labels=num_labels, allow_pickle=allow_pickle, attn_implementation=self.attn_implementation
        ).train()
        self.val_metrics = BackdoorMetrics(num_labels, "val/")
        self.test_metrics = BackdoorMetrics(num_labels, "test/")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        seed_step(self)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["labels"]))
        return out.loss

    def _eval_step(self, batch: dict, metrics: BackdoorMetrics) -> None:
        preds = self(batch["input_ids"], batch["attention_mask"]).argmax(-1)
        metrics.update(preds, batch["labels"], batch["poisoned"])
        self.log_dict(metrics.loggable(), add_dataloader_idx=False, batch_size=len(preds))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).softmax(-1)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return opt
        sched = linear_schedule(opt, hp.warmup_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        # after the checkpoint is restored: see LinearDecay
        for config in self.trainer.lr_scheduler_configs:
            set_schedule_length(config.scheduler, self.trainer.estimated_stepping_batches)
