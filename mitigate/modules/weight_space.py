"""Weight-space mitigations (Reinit, Fine-pruning, Fine-mixing, Fine-purifying, E-PUR): a
transform of the suspicious model, then clean fine-tuning on the defender's data (the CFT
objective). The suspicious model is evaluated beside the cleaned one."""

from __future__ import annotations

import copy
import logging
import time
from typing import Literal

import torch
from torch import nn

from mitigate.callbacks.progress import LogProgress
from mitigate.guard import clean_report
from mitigate.metrics import BackdoorMetrics
from mitigate.mitigations import EPUR, WeightTransform
from mitigate.models.loading import load_reference
from mitigate.modules.classifier import TextClassifier, linear_schedule, set_schedule_length
from mitigate.weight_space import reference_state

log = logging.getLogger(__name__)


class WeightSpaceMitigation(TextClassifier):
    """Transform, then clean fine-tuning.

    Args:
        model: the suspicious classifier (hub id or folder).
        transform: Reinit, FinePruning, FineMixing or FinePurifying (null: none, e.g. E-PUR alone
            or plain CFT).
        epur: Embedding Purification after the transform (null: off).
        reference: the clean pre-trained checkpoint the suspicious model was fine-tuned from
            (hub id or folder, loaded by the same safe loader); needed by FineMixing,
            FinePurifying and E-PUR. Names and shapes are checked against the model up front.
        lr, weight_decay, schedule, warmup_ratio: the clean fine-tuning (CFT: 2e-5, 0, linear).
    """

    def __init__(
        self,
        model: str,
        num_labels: int = 2,
        transform: WeightTransform | None = None,
        epur: EPUR | None = None,
        reference: str | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        warmup_ratio: float = 0.0,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(model, num_labels, lr, weight_decay, schedule, warmup_ratio, allow_pickle)
        if reference is None and ((transform is not None and transform.needs_reference) or epur is not None):
            raise ValueError(f"{transform or epur!r} needs the clean pre-trained weights: set model.init_args.reference")
        self.save_hyperparameters(ignore=["transform", "epur"])
        self.transform, self.epur = transform, epur
        self.suspicious = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.test_metrics = nn.ModuleDict({
            "suspicious": BackdoorMetrics(num_labels, "test/suspicious/"), "model": BackdoorMetrics(num_labels, "test/"),
        })
        #: what the run chose on clean data (written to results.json / .md, kept in checkpoints)
        self.report: dict = {}
        #: the transform's state during fine-tuning (pruned units), kept in checkpoints
        self.state: dict = {}
        self.reference: dict | None = None

    report_rows = {"suspicious": "suspicious model", "": "cleaned"}

    # -- the transform, once, before fine-tuning ---------------------------------------------------
    def on_fit_start(self) -> None:
        if "transform" in self.report:  # resumed: the transform is in the restored weights
            return
        start = time.perf_counter()
        if self.hparams.reference is not None:
            ref, missing = load_reference(self.hparams.reference, self.hparams.num_labels, self.hparams.allow_pickle)
            self.reference = {k: v.to(self.device) for k, v in reference_state(self.model, ref, missing, f"reference {self.hparams.reference}").items()}
            del ref
        self.report["suspicious_dev_cacc"] = self.dev_report(self.model)["cacc"]
        self.report["transform"] = {"name": repr(self.transform)}
        if self.transform is not None:
            self.report["transform"].update(self.transform.apply(self))
        if self.epur is not None:
            self.report["epur"] = {"name": repr(self.epur), **self.epur.apply(self.model, self.reference, self.trainer.datamodule)}
        self.report["transformed_dev_cacc"] = self.dev_report(self.model)["cacc"]
        self.report["transform_seconds"] = round(time.perf_counter() - start, 1)
        self.reference = None
        log.info("transform done: dev CACC %.2f -> %.2f (%.0f s)", self.report["suspicious_dev_cacc"],
                 self.report["transformed_dev_cacc"], self.report["transform_seconds"])

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.transform is not None:
            self.transform.after_step(self.model, self.state)

    # -- helpers the transforms use ----------------------------------------------------------------
    def dev_report(self, model: nn.Module) -> dict:
        dm = self.trainer.datamodule
        return clean_report(model, dm.dataset("dev"), dm.tokenizer.pad_token_id)

    def clean_batches(self) -> list[dict]:
        """The defender's clean training data in batches (the fine-tuning's own loader order)."""
        return list(self.trainer.datamodule.train_dataloader())

    def probe(self, model: nn.Module, epochs: int) -> nn.Module:
        """``model`` fine-tuned ``epochs`` epochs on the clean training data with the run's own
        optimiser and schedule (AdamW, the run's rate, linear decay over the probe's steps when
        the run decays): the fine-tune a candidate setting is judged by. With ``epochs`` equal to
        the run's, it is the final fine-tune up to dropout masks and data order."""
        hp = self.hparams
        model.train().requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        loader = self.trainer.datamodule.train_dataloader()
        sched = None
        if hp.schedule == "linear":
            sched = linear_schedule(opt, hp.warmup_ratio)
            set_schedule_length(sched, epochs * len(loader))
        bar = LogProgress(epochs * len(loader), "probe fine-tune", enabled=self.trainer.is_global_zero)
        step = 0
        for _ in range(epochs):
            for batch in loader:
                torch.manual_seed(1_000_003 + step)
                b = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if self.transform is not None:
                    self.transform.after_step(model, self.state)
                step += 1
                bar.update()
        bar.close()
        return model.eval()

    # -- checkpoints and evaluation ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mitigate_report"] = self.report
        checkpoint["mitigate_state"] = self.state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.report = checkpoint.get("mitigate_report", {})
        self.state = checkpoint.get("mitigate_state", {})

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        for name, metrics in self.test_metrics.items():
            model = self.suspicious if name == "suspicious" else self.model
            preds = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
            metrics.update(preds, batch["labels"], batch["poisoned"])
            self.log_dict(metrics.loggable(), add_dataloader_idx=False, batch_size=len(preds))
