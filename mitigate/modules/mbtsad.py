"""MBTSAD in one ``fit``: token-splitting retraining of a copy of the suspicious model (TS-FT,
the teacher), then attention distillation into the original suspicious model (the student).
The data module supplies the token-split clean data (``data.token_split``) for both steps."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn

from mitigate.losses import DistillationLoss
from mitigate.metrics import BackdoorMetrics
from mitigate.models.loading import load_classifier
from mitigate.modules.classifier import linear_schedule, seed_step, set_schedule_length

Ablation = Literal["no-att", "no-hid", "ce-only"]


class MBTSAD(pl.LightningModule):
    """Backdoor mitigation by token splitting and attention distillation.

    Epochs ``0 .. tsft_epochs - 1`` fine-tune the teacher (a copy of ``model``) with
    cross-entropy at ``tsft_lr``; the remaining ``trainer.max_epochs - tsft_epochs`` epochs train
    the student (``model`` itself) with L = alpha * L_at + beta * L_hid + L_ce against the
    frozen teacher at ``lr``. Validation reports the model being trained in the current step.
    ``test`` reports the suspicious model (as loaded), the teacher and the student (the output,
    under ``test/cacc``, ``test/asr``) on the same data.

    Args:
        model: the suspicious checkpoint (hub id or folder, safetensors).
        num_labels: number of classes (the CLI links it to the data).
        teacher: an already trained TS-FT teacher to distil from; then ``tsft_epochs`` must be 0.
        tsft_epochs, tsft_lr, tsft_schedule: TS-FT training of the teacher (``constant`` learning
            rate, or ``linear`` decay to 0 over the TS-FT epochs after the warm-up).
        lr: learning rate of the distillation.
        alpha, beta, p, att_layers, hid_layers, ablation: see ``mitigate.losses.DistillationLoss``.
        weight_decay: AdamW weight decay, both steps.
        schedule: the distillation's learning rate, ``constant`` or ``linear`` decay to 0 over
            the distillation epochs.
        warmup_ratio: linear warm-up share of each step's steps (``linear`` schedules).
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    def __init__(
        self,
        model: str = "runs/badnet_sst2/model",
        num_labels: int = 2,
        teacher: str | None = None,
        tsft_epochs: int = 3,
        tsft_lr: float = 1e-4,
        tsft_schedule: Literal["constant", "linear"] = "linear",
        lr: float = 2e-5,
        alpha: float = 1.0,
        beta: float = 1.0,
        p: float = 2.0,
        att_layers: Sequence[int] | None = None,
        hid_layers: Sequence[int] | None = None,
        ablation: Ablation | None = None,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        warmup_ratio: float = 0.0,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        if teacher is not None and tsft_epochs != 0:
            raise ValueError("model.teacher is an already trained teacher: set model.tsft_epochs to 0")
        if teacher is None and tsft_epochs < 1:
            raise ValueError("model.tsft_epochs must be >= 1 (or give a trained model.teacher)")
        self.save_hyperparameters()
        self.automatic_optimization = False  # two optimizers, one per step of the method

        def load(src: str) -> nn.Module:
            # eager attention: fused kernels do not return the attention probabilities
            return load_classifier(src, num_labels=num_labels, allow_pickle=allow_pickle, attn_implementation="eager")

        self.model = load(model).train()  # the student; exported as the cleaned checkpoint
        self.suspicious = copy.deepcopy(self.model).eval().requires_grad_(False)  # for the report only
        self.teacher = copy.deepcopy(self.model) if teacher is None else load(teacher)
        self.distillation_loss = DistillationLoss(alpha, beta, p, att_layers, hid_layers, ablation)
        self.val_metrics = BackdoorMetrics(num_labels, "val/")
        self.test_metrics = nn.ModuleDict({
            "suspicious": BackdoorMetrics(num_labels, "test/suspicious/"),
            "teacher": BackdoorMetrics(num_labels, "test/teacher/"),
            "model": BackdoorMetrics(num_labels, "test/"),
        })

    #: rows of results.md, in order (see mitigate.callbacks.results.results_table)
    report_rows = {"suspicious": "suspicious model", "teacher": "TS-FT (teacher)", "": "MBTSAD (student)"}

    # -- phases ---------------------------------------------------------------------------
    @property
    def in_tsft(self) -> bool:
        return self.current_epoch < self.hparams.tsft_epochs

    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs <= self.hparams.tsft_epochs:
            raise ValueError(
                f"trainer.max_epochs ({max_epochs}) must exceed model.tsft_epochs ({self.hparams.tsft_epochs}): "
                "the epochs after TS-FT are the distillation"
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        seed_step(self)
        if self.in_tsft:
            self.teacher.train()
        else:
            self.teacher.eval()  # frozen: no dropout, and its forward runs under no_grad
            self.model.train()
        self.suspicious.eval()

    def configure_optimizers(self):
        hp = self.hparams
        opt_t = torch.optim.AdamW(self.teacher.parameters(), lr=hp.tsft_lr, weight_decay=hp.weight_decay)
        opt_s = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

        def schedule(opt, kind: str):
            if kind == "constant":
                return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
            return linear_schedule(opt, hp.warmup_ratio)

        return [opt_t, opt_s], [schedule(opt_t, hp.tsft_schedule), schedule(opt_s, hp.schedule)]

    def on_train_start(self) -> None:
        # the schedules' lengths, once the checkpoint is restored (see classifier.LinearDecay)
        per_epoch = max(1, self.trainer.estimated_stepping_batches // self.trainer.max_epochs)
        sched_t, sched_s = self.lr_schedulers()
        set_schedule_length(sched_t, self.hparams.tsft_epochs * per_epoch)
        set_schedule_length(sched_s, (self.trainer.max_epochs - self.hparams.tsft_epochs) * per_epoch)

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        (opt_t, opt_s), (sched_t, sched_s) = self.optimizers(), self.lr_schedulers()
        n = len(batch["labels"])
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.in_tsft:
            loss = self.teacher(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt, sched = opt_t, sched_t
            self.log("train/tsft_loss", loss, prog_bar=True, batch_size=n)
        else:
            lf = self.distillation_loss
            kw = dict(
                input_ids=ids, attention_mask=mask,
                output_attentions=lf.needs_attentions, output_hidden_states=lf.needs_hidden_states,
            )
            with torch.no_grad():
                t_out = self.teacher(**kw)
            terms = lf(t_out, self.model(**kw), labels, mask)
            loss, opt, sched = terms["loss"], opt_s, sched_s
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
            self.log_dict({f"train/{k}": terms[k] for k in ("at", "hid", "ce")}, batch_size=n)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        sched.step()
        return loss

    # -- evaluation -----------------------------------------------------------------------
    @staticmethod
    def _predict(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        preds = self._predict(self.teacher if self.in_tsft else self.model, batch)
        self.val_metrics.update(preds, batch["labels"], batch["poisoned"])
        self.log_dict(self.val_metrics.loggable(), add_dataloader_idx=False, batch_size=len(preds))

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        models = {"suspicious": self.suspicious, "teacher": self.teacher, "model": self.model}
        for name, metrics in self.test_metrics.items():
            preds = self._predict(models[name], batch)
            metrics.update(preds, batch["labels"], batch["poisoned"])
            self.log_dict(metrics.loggable(), add_dataloader_idx=False, batch_size=len(preds))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
