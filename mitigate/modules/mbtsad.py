"""MBTSAD in one ``fit``: token-splitting retraining of a copy of the suspicious model (TS-FT,
the teacher), then attention distillation into the original suspicious model (the student).
The data module supplies the token-split clean data (``data.token_split``) for both steps."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn

from mitigate.callbacks.progress import LogProgress
from mitigate.guard import CollapseError, clean_report, collapse_reason
from mitigate.losses import DistillationLoss
from mitigate.metrics import BackdoorMetrics
from mitigate.mitigations import EPUR
from mitigate.models.loading import load_classifier, load_reference
from mitigate.modules.classifier import linear_schedule, seed_step, set_schedule_length
from mitigate.trigger_scan import TriggerScan
from mitigate.weight_space import reference_state

log = logging.getLogger(__name__)

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
            rate, or ``linear`` decay to 0 over the TS-FT epochs after the warm-up); ``tsft_lr``
            may list candidate rates, chosen on clean dev data (see ``probe_fraction``).
        lr: learning rate of the distillation; None: the (chosen) TS-FT rate.
        alpha, beta, p, att_layers, hid_layers, ablation: see ``mitigate.losses.DistillationLoss``.
        weight_decay: AdamW weight decay, both steps.
        schedule: the distillation's learning rate, ``constant`` or ``linear`` decay to 0 over
            the distillation epochs.
        warmup_ratio: linear warm-up share of each step's steps (``linear`` schedules).
        scan: a ``TriggerScan``: before training, the suspicious model's vocabulary is scanned on
            the clean dev data for tokens and phrases that flip it; during distillation a share of
            the samples gets one inserted, their labels unchanged, and learns from the labels
            alone (cross-entropy, no distillation terms). Not in the paper.
        unlearn_tsft: insert the scan's suspects during TS-FT too (then the teacher unlearns them).
        probe_fraction, probe_cacc_drop: when ``tsft_lr`` lists candidate rates, each trains a
            copy of the suspicious model for ``probe_fraction`` of a TS-FT epoch; the largest
            whose copy keeps the clean-dev accuracy within ``probe_cacc_drop`` points of the
            suspicious model's (and does not collapse) is chosen.
        max_cacc_drop, max_class_share: the collapse guard: a teacher or student that ends below
            the suspicious model's dev CACC minus ``max_cacc_drop`` points, or that predicts one
            class for ``max_class_share`` of dev (None: no such check), stops the run before
            anything is exported.
        epur: Embedding Purification of the suspicious weights before anything trains (the
            teacher's start and the student's); needs ``reference``.
        reference: the clean pre-trained checkpoint the suspicious model came from (E-PUR only).
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    def __init__(
        self,
        model: str = "runs/badnet_sst2/model",
        num_labels: int = 2,
        teacher: str | None = None,
        tsft_epochs: int = 3,
        tsft_lr: float | list[float] = 1e-4,
        tsft_schedule: Literal["constant", "linear"] = "linear",
        lr: float | None = 2e-5,
        alpha: float = 1.0,
        beta: float = 1.0,
        p: float = 2.0,
        att_layers: Sequence[int] | None = None,
        hid_layers: Sequence[int] | None = None,
        ablation: Ablation | None = None,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        warmup_ratio: float = 0.0,
        scan: TriggerScan | None = None,
        unlearn_tsft: bool = False,
        probe_cacc_drop: float = 1.5,
        max_cacc_drop: float = 5.0,
        max_class_share: float | None = 0.95,
        probe_fraction: float = 0.25,
        epur: EPUR | None = None,
        reference: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        rates = tsft_lr if isinstance(tsft_lr, (list, tuple)) else [tsft_lr]
        if not rates or any(r <= 0 for r in rates) or (lr is not None and lr <= 0):
            raise ValueError(f"model.tsft_lr and model.lr must be positive (tsft_lr may list candidates), got {tsft_lr}, {lr}")
        if not 0.0 < probe_fraction <= 1.0:
            raise ValueError(f"model.probe_fraction must be in (0, 1], got {probe_fraction}")
        if teacher is not None and tsft_epochs != 0:
            raise ValueError("model.teacher is an already trained teacher: set model.tsft_epochs to 0")
        if teacher is None and tsft_epochs < 1:
            raise ValueError("model.tsft_epochs must be >= 1 (or give a trained model.teacher)")
        if epur is not None and reference is None:
            raise ValueError("model.epur needs the clean pre-trained weights: set model.init_args.reference")
        self.save_hyperparameters(ignore=["scan", "epur"])
        self.scan = scan
        self.epur = epur
        #: what the run chose from clean data (trigger scan, ...): plain values, kept in the
        #: checkpoints (a resumed run does not choose again) and written to results.json / .md
        self.report: dict = {}
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
        ddp = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if ddp is not None and self.trainer.world_size > 1 and not ddp.get("find_unused_parameters", False):
            raise ValueError(
                "MBTSAD trains one of its two models in each step, so DDP must allow unused parameters: "
                "use --trainer.strategy ddp_find_unused_parameters_true"
            )
        if "suspicious_dev" in self.report:  # resumed: the choices are in the checkpoint
            return
        dm = self.trainer.datamodule
        self.report["suspicious_dev"] = clean_report(self.suspicious, dm.dataset("dev"), dm.tokenizer.pad_token_id)
        if self.epur is not None:
            self._purify_embeddings()
        if self.scan is not None:
            self._scan_for_triggers()
        rates = self.hparams.tsft_lr
        if isinstance(rates, (list, tuple)) and self.hparams.tsft_epochs > 0:
            self._choose_tsft_lr(sorted(rates, reverse=True))
        self._set_learning_rates()

    # -- choices made on clean data --------------------------------------------------------
    @property
    def min_cacc(self) -> float:
        """The clean-dev accuracy bound of every phase: the suspicious model's minus max_cacc_drop."""
        return self.report["suspicious_dev"]["cacc"] - self.hparams.max_cacc_drop

    def _guard(self, name: str, model: nn.Module) -> dict:
        """Clean-dev report of ``model``; a CollapseError if it collapsed or fell below the bound."""
        dm = self.trainer.datamodule
        report = clean_report(model, dm.dataset("dev"), dm.tokenizer.pad_token_id)
        reason = collapse_reason(report, self.hparams.max_class_share, self.min_cacc)
        if reason:
            raise CollapseError(
                f"collapse guard: {name} is not a usable cleaning: {reason} (suspicious model: dev CACC "
                f"{self.report['suspicious_dev']['cacc']:.2f}); nothing is exported. Lower model.tsft_lr / model.lr "
                f"(or give tsft_lr candidates to choose from)"
            )
        return report

    def _choose_tsft_lr(self, candidates: list[float]) -> None:
        """The largest TS-FT rate whose short probe (``probe_fraction`` of a TS-FT epoch from the
        suspicious model, on the same training data) keeps the clean-dev accuracy within
        ``probe_cacc_drop`` points of the suspicious model's and predicts no class for more
        than ``max_class_share`` of dev."""
        dm = self.trainer.datamodule
        tried = []
        bound = self.report["suspicious_dev"]["cacc"] - self.hparams.probe_cacc_drop
        for lr in candidates:
            start = time.perf_counter()
            probe = self._probe(lr)
            report = clean_report(probe, dm.dataset("dev"), dm.tokenizer.pad_token_id)
            reason = collapse_reason(report, self.hparams.max_class_share, bound)
            tried.append({"lr": lr, **report, "accepted": reason is None, "seconds": round(time.perf_counter() - start, 1)})
            log.info("TS-FT rate %g: dev CACC %.2f, class shares %s -> %s", lr, report["cacc"], report["shares"], reason or "accepted")
            del probe
            if reason is None:
                break
        self.report["tsft_lr_choice"] = {"candidates": candidates, "tried": tried, "min_cacc": bound}
        chosen = next((t["lr"] for t in tried if t["accepted"]), None)
        if chosen is None:
            raise CollapseError(
                f"no TS-FT rate among {candidates} keeps the clean dev accuracy above {bound:.2f} "
                f"without collapsing (probes: {[(t['lr'], t['cacc']) for t in tried]}); give lower model.tsft_lr candidates"
            )
        self.report["tsft_lr_choice"]["chosen"] = chosen

    def _probe(self, lr: float) -> nn.Module:
        """A copy of the suspicious model after TS-FT steps at ``lr``."""
        hp, dm = self.hparams, self.trainer.datamodule
        model = copy.deepcopy(self.suspicious).train().requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=hp.weight_decay)
        loader = dm.train_dataloader()
        steps = max(1, math.ceil(hp.probe_fraction * len(loader)))
        bar = LogProgress(steps, f"TS-FT rate probe {lr:g}", enabled=self.trainer.is_global_zero)
        for step, batch in zip(range(steps), loader):
            torch.manual_seed(self.trainer.max_epochs * 1_000_003 + step)  # dropout, as seed_step does
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if self.scan is not None and hp.unlearn_tsft:
                batch, _ = self.scan.unlearning_batch(batch, self._suspect_ids(), step, dm.tokenizer.pad_token_id)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
        bar.close()
        return model.eval()

    @property
    def chosen_tsft_lr(self) -> float:
        rates = self.hparams.tsft_lr
        if isinstance(rates, (list, tuple)):
            return self.report.get("tsft_lr_choice", {}).get("chosen", max(rates))
        return rates

    def _set_learning_rates(self) -> None:
        """The optimizers' rates once chosen (the distillation's is the TS-FT one when lr is None)."""
        tsft = self.chosen_tsft_lr
        distill = self.hparams.lr if self.hparams.lr is not None else tsft
        for opt, sched, lr in zip(self.optimizers(), self.lr_schedulers(), (tsft, distill)):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] = lr
            sched.base_lrs = [lr] * len(opt.param_groups)
            sched._last_lr = [lr] * len(opt.param_groups)
        self.report["learning_rates"] = {"tsft": tsft, "distillation": distill}

    def on_train_epoch_end(self) -> None:
        if self.current_epoch == self.hparams.tsft_epochs - 1:
            self.report["teacher_dev"] = self._guard("the TS-FT teacher", self.teacher)

    def on_train_end(self) -> None:
        self.report["student_dev"] = self._guard("the MBTSAD student", self.model)

    def _purify_embeddings(self) -> None:
        """E-PUR on the weights both training phases start from (the student and, when it is
        trained here, the teacher)."""
        hp, dm = self.hparams, self.trainer.datamodule
        ref, missing = load_reference(hp.reference, hp.num_labels, hp.allow_pickle)
        reference = {k: v.to(self.device) for k, v in reference_state(self.model, ref, missing, f"reference {hp.reference}").items()}
        del ref
        self.report["epur"] = {"name": repr(self.epur), **self.epur.apply(self.model, reference, dm)}
        if hp.teacher is None:
            self.epur.apply(self.teacher, reference, dm)

    def _scan_for_triggers(self) -> None:
        dm = self.trainer.datamodule
        start = time.perf_counter()
        suspects, rows = self.scan(self.suspicious, dm.tokenizer, dm.examples("dev"), dm.examples("dev") + dm.clean_subset)
        self.report["trigger_scan"] = {
            "settings": self.scan.settings(), "suspects": [s.text for s in suspects],
            "suspect_ids": [list(s.token_ids) for s in suspects], "verified": rows,
            "seconds": round(time.perf_counter() - start, 1),
        }
        log.info("trigger scan: %d suspects %s (%.0f s)", len(suspects), [s.text for s in suspects],
                 self.report["trigger_scan"]["seconds"])

    def _suspect_ids(self) -> list[list[int]]:
        """The suspects' token ids (one list per token or phrase)."""
        return self.report.get("trigger_scan", {}).get("suspect_ids", [])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mitigate_report"] = self.report

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.report = checkpoint.get("mitigate_report", {})

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
        # the rates are set in on_fit_start, once chosen (see _set_learning_rates)
        opt_t = torch.optim.AdamW(self.teacher.parameters(), lr=self.chosen_tsft_lr, weight_decay=hp.weight_decay)
        opt_s = torch.optim.AdamW(self.model.parameters(), lr=hp.lr or self.chosen_tsft_lr, weight_decay=hp.weight_decay)

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
        unlearn = self.scan is not None and (not self.in_tsft or self.hparams.unlearn_tsft)
        if unlearn:  # suspects inserted into some rows, labels unchanged
            pad = self.trainer.datamodule.tokenizer.pad_token_id
            batch, rows = self.scan.unlearning_batch(batch, self._suspect_ids(), self.global_step, pad)
        else:
            rows = torch.zeros(n, dtype=torch.bool, device=batch["labels"].device)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if self.in_tsft:
            loss = self.teacher(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt, sched = opt_t, sched_t
            self.log("train/tsft_loss", loss, prog_bar=True, batch_size=n)
        else:
            # rows with an inserted suspect learn from their labels only: the teacher's attention
            # and hidden states on them may still carry the backdoor
            keep, lf = ~rows, self.distillation_loss
            at = hid = ce_k = ce_u = torch.zeros((), device=ids.device)
            if keep.any():
                width = int(mask[keep].sum(1).max())  # the inserted rows' extra columns are not needed
                k_ids, k_mask = ids[keep, :width], mask[keep, :width]
                kw = dict(input_ids=k_ids, attention_mask=k_mask,
                          output_attentions=lf.needs_attentions, output_hidden_states=lf.needs_hidden_states)
                with torch.no_grad():
                    t_out = self.teacher(**kw)
                terms = lf(t_out, self.model(**kw), labels[keep], k_mask)
                at, hid, ce_k = terms["at"], terms["hid"], terms["ce"]
            if rows.any():
                ce_u = self.model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
                self.log("train/unlearn_ce", ce_u, batch_size=int(rows.sum()))
            ce = (ce_k * int(keep.sum()) + ce_u * int(rows.sum())) / n
            loss = lf.alpha * at + lf.beta * hid + ce
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
            self.log_dict({"train/at": at, "train/hid": hid, "train/ce": ce}, batch_size=n)
            opt, sched = opt_s, sched_s
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
