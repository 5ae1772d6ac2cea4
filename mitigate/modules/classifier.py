"""Supervised training of a sequence classifier: poisoned training (the attack, when the data
module trains on the poisoned mix) and clean fine-tuning (BERT-CFT: the same objective on the
defender's clean subset, starting from the suspicious checkpoint)."""

from __future__ import annotations

import os
from typing import Literal

import lightning.pytorch as pl
import torch
from transformers import get_linear_schedule_with_warmup

from mitigate.metrics import BackdoorMetrics
from mitigate.models.loading import load_classifier


def seed_step(module: pl.LightningModule) -> None:
    """Dropout masks as a function of (seed, step, rank): a run resumed mid-epoch draws the
    same masks as an uninterrupted one."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    torch.manual_seed((seed * 1_000_003 + module.global_step) * 64 + module.global_rank)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.0):
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), max(1, total_steps))


class TextClassifier(pl.LightningModule):
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
        self.model = load_classifier(model, num_labels=num_labels, allow_pickle=allow_pickle).train()
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
        sched = linear_schedule(opt, self.trainer.estimated_stepping_batches, hp.warmup_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
