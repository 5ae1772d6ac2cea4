"""MBTSAD (backdoor mitigation by token splitting and attention distillation) in one ``fit``:
token-splitting retraining of a copy of the suspicious model (TS-FT, the teacher), then
attention distillation into the original suspicious model (the student). The data module
supplies the token-split clean data (``data.token_split``) for both steps; the trigger scan
(``mitigate.mitigations.detection.word_scan``) and the learning-rate choice are this toolkit's
additions, made on clean data before training."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist

from mitigate.guard import CollapseError, collapse_reason, metric_name, score
from mitigate.loading import load_classifier
from mitigate.mitigations.base import Mitigation
from mitigate.mitigations.mbtsad.distillation import DistillationLoss
from mitigate.mitigations.mbtsad.export_choice import choose_output, live_triggers, needs_teacher
from mitigate.mitigations.detection import TriggerInversion, scan_checkpoint, trigger_flip_rates
from mitigate.mitigations.detection.neighbours import embedding_neighbours, unlearning_ids
from mitigate.mitigations.detection.control import CleanControl
from mitigate.mitigations.detection.word_scan import Suspect, TriggerScan
from mitigate.mitigations.weight_space.transforms import EPUR, FineMixing, TransformContext
from mitigate.training import SEED_STRIDE, linear_schedule, seed_step, set_schedule_length

log = logging.getLogger(__name__)

Ablation = Literal["no-att", "no-hid", "ce-only"]


class MBTSAD(Mitigation):
    """Backdoor mitigation by token splitting and attention distillation (the MBTSAD paper).

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
        tsft_epochs: epochs of TS-FT (the teacher's training).
        tsft_lr: TS-FT learning rate, or a list of candidates chosen on clean dev data (the
            largest whose probe passes, see ``probe_fraction``).
        tsft_schedule: TS-FT's rate: ``constant``, or ``linear`` decay to 0 over the TS-FT epochs
            after the warm-up.
        lr: learning rate of the distillation; None: the (chosen) TS-FT rate.
        alpha: weight of the attention-transfer loss.
        beta: weight of the hidden-state loss.
        p: the Attention Enhancement exponent.
        att_layers: transformer layers (0-based) whose attentions are distilled; None: all.
        hid_layers: hidden states distilled (0 = the embedding output); None: all.
        ablation: ``no-att``, ``no-hid`` or ``ce-only`` (the paper's ablations), or None.
        weight_decay: AdamW weight decay, both steps.
        schedule: the distillation's learning rate, ``constant`` or ``linear`` decay to 0 over
            the distillation epochs.
        warmup_ratio: linear warm-up share of each step's steps (``linear`` schedules).
        scan: the trigger scan's settings (``TriggerScan``; null: no scan). Before training, the
            suspicious model's vocabulary is scanned on the clean dev data for tokens and phrases
            that flip it; during distillation a share of the samples gets one inserted, their
            labels unchanged, and learns from the labels alone. Not in the paper.
        unlearn_tsft: insert the scan's suspects during TS-FT too (then the teacher unlearns them).
        probe_cacc_drop: a candidate TS-FT rate is accepted when its probe keeps the clean-dev
            accuracy within this many points of the suspicious model's (and does not collapse).
        max_cacc_drop: the collapse guard: a teacher or student that ends more than this many
            points below the suspicious model's dev CACC stops the run before anything is exported.
        max_class_share: the collapse guard: a teacher or student that predicts one class for
            this share of dev stops the run (None: not checked).
        probe_fraction: each candidate TS-FT rate trains a copy of the weights TS-FT starts from
            (after Fine-mixing / E-PUR, when set) for this fraction of a TS-FT epoch.
        rate_backoff: when every candidate TS-FT rate fails its probe, halve the smallest and
            probe again, up to this many times, before the run refuses (0: refuse at once). The
            same rates below the chosen one are what a teacher that fails the collapse guard after
            its TS-FT is trained again at, in order, before the guard refuses the run.
        inversion: the trigger inversion's settings (``TriggerInversion``; null: none): a soft
            trigger of several tokens optimised in embedding space per label, decoded and verified
            on clean dev data; what it finds joins the scan's suspects (and is unlearned).
        epur: Embedding Purification of the suspicious weights before anything trains (the
            teacher's start and the student's); needs ``reference``.
        mixing: Fine-mixing of the suspicious weights towards ``reference`` before anything
            trains (its rho chosen on clean dev data, ``FineMixing``); skipped, and said so in
            the report's plan, when no reference is given.
        rescan: after training, measure the found triggers' flip rate on clean dev data for the
            suspicious and the cleaned model, and run the trigger inversion on the cleaned model
            again (``report["rescan"]``).
        reference: the clean pre-trained checkpoint the suspicious model came from (E-PUR,
            Fine-mixing and the clean control).
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
        control: the clean control's settings (``CleanControl``; null: none). With a
            ``reference``, a clean control is fine-tuned from it on the clean training data
            before the scan, and a suspect that flips it too is a natural feature of the task:
            reported, not unlearned. Not used without a reference.
        live_flip: the export choice (None: the student is always the output, as in the paper,
            and a student that fails the collapse guard refuses the run). A found trigger is
            still live on a model when it flips at least this share of the clean dev samples it
            is inserted into to its label (``trigger_flip_rates``, as the re-scan measures it).
            After the distillation the TS-FT teacher is exported in the student's place when
            the student fails the collapse guard and the teacher passed it, or when more found
            triggers are live on the student than on the teacher; ``report["export_choice"]``
            holds both models' clean-dev evidence. Not in the paper.
    """

    # eager attention: fused kernels do not return the attention probabilities
    attn_implementation = "eager"
    evaluated = {"suspicious": "suspicious model", "teacher": "TS-FT (teacher)", "model": "MBTSAD (student)"}

    @property
    def report_rows(self) -> dict[str, str]:
        rows = super().report_rows
        if (self.report.get("export_choice") or {}).get("exported") == "teacher":
            rows[""] = "output: the TS-FT teacher (export choice)"
        return rows

    def guard_hint(self, name: str) -> str:
        """What to change when the collapse guard fires, from what the run already tried: the
        teacher's TS-FT rate (and the rates below it) or, for the student, the distillation's."""
        if name != "the TS-FT teacher":
            return ("lower model.lr (the distillation's rate; null follows the TS-FT rate)" if self.hparams.lr is None
                    else "lower model.lr (the distillation's rate)")
        back = self.report.get("teacher_backoff", {})
        tried = back.get("tried")
        if tried and back.get("chosen") is None:
            rates = ", ".join(f"{t['lr']:g}" for t in tried)
            return (f"the teacher was trained again at every lower TS-FT rate ({rates}) and none passed: check the "
                    "clean data and the checkpoint, or raise model.rate_backoff")
        if isinstance(self.hparams.tsft_lr, (list, tuple)):
            return "raise model.rate_backoff (no lower TS-FT rate was left to try), or give lower model.tsft_lr candidates"
        return "lower model.tsft_lr, raise model.rate_backoff, or give tsft_lr candidates to choose from"

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
        rate_backoff: int = 3,
        inversion: TriggerInversion | None = None,
        epur: EPUR | None = None,
        mixing: FineMixing | None = None,
        rescan: bool = False,
        reference: str | None = None,
        allow_pickle: bool = False,
        control: CleanControl | None = None,
        live_flip: float | None = None,
    ) -> None:
        rates = tsft_lr if isinstance(tsft_lr, (list, tuple)) else [tsft_lr]
        if not rates or any(r <= 0 for r in rates) or (lr is not None and lr <= 0):
            raise ValueError(f"model.tsft_lr and model.lr must be positive (tsft_lr may list candidates), got {tsft_lr}, {lr}")
        if rate_backoff < 0:
            raise ValueError(f"model.rate_backoff must be >= 0, got {rate_backoff}")
        if not 0.0 < probe_fraction <= 1.0:
            raise ValueError(f"model.probe_fraction must be in (0, 1], got {probe_fraction}")
        if teacher is not None and tsft_epochs != 0:
            raise ValueError("model.teacher is an already trained teacher: set model.tsft_epochs to 0")
        if teacher is None and tsft_epochs < 1:
            raise ValueError("model.tsft_epochs must be >= 1 (or give a trained model.teacher)")
        if epur is not None and reference is None:
            raise ValueError("model.epur needs the clean pre-trained weights: set model.init_args.reference")
        if live_flip is not None and not 0.0 < live_flip <= 1.0:
            raise ValueError(f"model.live_flip must be in (0, 1] (a share of clean dev samples) or null, got {live_flip}")
        super().__init__(model, num_labels, lr, weight_decay, schedule, warmup_ratio, reference, max_cacc_drop,
                         max_class_share, allow_pickle)
        self.save_hyperparameters(ignore=["scan", "inversion", "epur", "mixing", "control"])
        # the searches' settings as plain values: checked against the config when a run resumes
        self.hparams["scan"] = dataclasses.asdict(scan) if scan is not None else None
        self.hparams["inversion"] = dataclasses.asdict(inversion) if inversion is not None else None
        self.hparams["control"] = dataclasses.asdict(control) if control is not None else None
        self.control = control
        self.scan = scan
        self.inversion = inversion
        self.epur = epur
        self.mixing = mixing
        self.automatic_optimization = False  # two optimizers, one per step of the method
        self.teacher = copy.deepcopy(self.model) if teacher is None else load_classifier(
            teacher, num_labels=num_labels, allow_pickle=allow_pickle, attn_implementation=self.attn_implementation)
        self.distillation_loss = DistillationLoss(alpha, beta, p, att_layers, hid_layers, ablation)

    # -- phases ---------------------------------------------------------------------------
    @property
    def in_tsft(self) -> bool:
        """Whether the current epoch trains the teacher (TS-FT) rather than the student."""
        return self.current_epoch < self.hparams.tsft_epochs

    def check_trainer(self) -> None:
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

    def prepare(self) -> None:
        plan = self.report["plan"] = []
        if self.mixing is not None:
            if self.hparams.reference is None:
                plan.append({"step": "Fine-mixing towards the reference", "taken": False, "why": "no reference (clean pre-trained weights) given"})
            else:
                self.report["fine_mixing"] = self._transform_start(self.mixing)
                plan.append({"step": "Fine-mixing towards the reference", "taken": True,
                             "why": f"reference given; rho {self.report['fine_mixing']['rho']} chosen on clean dev"})
        if self.epur is not None:
            self.report["epur"] = self._transform_start(self.epur)
            plan.append({"step": "E-PUR", "taken": True, "why": "set in the recipe"})
        if self.scan is not None or self.inversion is not None:
            self._scan_for_triggers()
            found = self.report["trigger_scan"]["suspects"]
            natural = [r["text"] for r in self.report["trigger_scan"].get("control", []) if r["natural"]]
            why = (f"{len(found)} trigger(s) found on clean dev: {', '.join(found[:8])}" if found
                   else "the scan found no token or phrase that flips clean dev text")
            if natural:
                why += f"; {len(natural)} natural feature(s) of the task left alone (the clean control flips them too): {', '.join(natural[:8])}"
            near = self.report["trigger_scan"].get("neighbours", [])
            if near:
                why += (f"; with their {self.scan.unlearn_neighbours} nearest tokens in the input embeddings each ("
                        + "; ".join(f"{r['trigger']}: {' '.join(r['tokens'][:6])} ..." for r in near[:4]) + ")")
            plan.append({"step": "unlearning of the found triggers", "taken": bool(found), "why": why})
        rates = self.hparams.tsft_lr
        if isinstance(rates, (list, tuple)) and self.hparams.tsft_epochs > 0:
            self._choose_tsft_lr(sorted(rates, reverse=True))
        plan.append({"step": "TS-FT teacher, then attention distillation", "taken": True,
                     "why": f"TS-FT rate {self.chosen_tsft_lr:g}" + (" (chosen on clean dev)" if "tsft_lr_choice" in self.report else "")})

    def apply_choices(self) -> None:
        # on a resume Lightning restores the optimizers' saved state after this, over these values
        self._set_learning_rates()

    # -- choices made on clean data --------------------------------------------------------
    def _choose_tsft_lr(self, candidates: list[float]) -> None:
        """The largest TS-FT rate whose short probe (``probe_fraction`` of a TS-FT epoch from the
        weights TS-FT starts from: the suspicious model, or its Fine-mixed / E-PUR weights when a
        transform ran first; on the same training data) keeps the clean-dev accuracy (macro-F1 on
        an imbalanced task, ``mitigate.guard``) within ``probe_cacc_drop`` points of the
        suspicious model's and does not collapse onto one class. When every candidate fails,
        the smallest is halved and probed again, ``rate_backoff`` times at most."""
        hp = self.hparams
        tried = []
        bound = score(self.report["suspicious_dev"]) - hp.probe_cacc_drop
        backoff = self._backoff_rates(candidates)
        steps = max(1, math.ceil(hp.probe_fraction * self.batches_per_epoch(self.trainer.datamodule.train_dataloader(one_process=True))))
        prepare = self._unlearning_step if self.scan is not None and hp.unlearn_tsft else None
        for lr in [*candidates, *backoff]:
            start = time.perf_counter()
            probe = self.probe(copy.deepcopy(self.teacher), lr=lr, max_steps=steps, schedule="constant",
                               seed=self.trainer.max_epochs * SEED_STRIDE, prepare=prepare, progress=f"TS-FT rate probe {lr:g}")
            report = self.dev_report(probe)
            reason = collapse_reason(report, hp.max_class_share, bound)
            tried.append({"lr": lr, **report, "accepted": reason is None, "backed_off": lr < min(hp.tsft_lr),
                          "seconds": round(time.perf_counter() - start, 1)})
            log.info("TS-FT rate %g: dev CACC %.2f, class shares %s -> %s", lr, report["cacc"], report["shares"], reason or "accepted")
            del probe
            if reason is None:
                break
        self.report["tsft_lr_choice"] = {"candidates": candidates, "backoff": backoff, "tried": tried, "min_cacc": bound,
                                         "metric": self.report["suspicious_dev"].get("metric", "cacc")}
        chosen = next((t["lr"] for t in tried if t["accepted"]), None)
        if chosen is None:
            weak = self.weak_suspicious_model()
            fix = (f"the suspicious model itself {weak}: check the checkpoint and the data" if weak
                   else "give lower model.tsft_lr candidates, or raise model.rate_backoff")
            raise CollapseError(
                f"no TS-FT rate among {candidates} (nor {backoff}, below them) keeps the clean dev {metric_name(self.report['suspicious_dev'])} above {bound:.2f} "
                f"without collapsing (probes: {[(t['lr'], t['cacc']) for t in tried]}); {fix}"
            )
        self.report["tsft_lr_choice"]["chosen"] = chosen

    def _backoff_rates(self, candidates: Sequence[float]) -> list[float]:
        """The rates below the candidates: the smallest halved, ``rate_backoff`` times."""
        return [min(candidates) / 2**k for k in range(1, self.hparams.get("rate_backoff", 3) + 1)]

    def _rate_ladder(self) -> list[float]:
        """Every TS-FT rate the run may use, largest first: the candidates (or the one rate
        given), then the back-off halvings below them."""
        rates = self.hparams.tsft_lr
        rates = sorted(rates, reverse=True) if isinstance(rates, (list, tuple)) else [rates]
        return [*rates, *self._backoff_rates(rates)]

    def _unlearning_step(self, batch: dict, step: int) -> dict:
        """A probe batch with the scan's suspects inserted (as TS-FT does with ``unlearn_tsft``)."""
        return self.scan.unlearning_batch(batch, self._suspect_ids(), step, self.trainer.datamodule.tokenizer.pad_token_id)[0]

    @property
    def chosen_tsft_lr(self) -> float:
        """The TS-FT rate: the chosen candidate (the largest until chosen), or the one given."""
        backed_off = self.report.get("teacher_backoff", {}).get("chosen")
        if backed_off is not None:
            return backed_off
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
            if self.trainer.is_global_zero:
                self.report["teacher_dev"] = self._back_off_teacher()
            if self.distributed:  # one decision, rank 0's, and its teacher everywhere
                self._take_rank_zero_choices()
            if self.report.get("teacher_backoff", {}).get("chosen") is not None:
                self._set_learning_rates()
            self.report["teacher_dev"] = self.guard("the TS-FT teacher", self.teacher, self.report.get("teacher_dev"))

    def _back_off_teacher(self) -> dict:
        """The trained teacher's clean-dev report. When it fails the collapse guard (a probe
        passed, but the full TS-FT, in its own data order, did not), the teacher is trained again
        from the TS-FT start at each lower rate (the remaining candidates, then the
        ``rate_backoff`` halvings) until one passes, and that one's report is returned; the
        distillation then runs at that rate too when ``lr`` is None. The student has not trained
        yet, so it holds the weights TS-FT started from. Each try goes to
        ``report["teacher_backoff"]``; when none passes, the guard refuses the run as before."""
        hp = self.hparams
        first = self.dev_report(self.teacher)
        why = collapse_reason(first, hp.max_class_share, self.min_cacc)
        if why is None:
            return first
        failed = self.chosen_tsft_lr
        lower = [r for r in self._rate_ladder() if r < failed]
        log.warning("the TS-FT teacher at rate %g fails the collapse guard (%s): training it again at %s", failed, why,
                    ", ".join(f"{r:g}" for r in lower) or "no lower rate (model.rate_backoff is 0)")
        prepare = self._unlearning_step if self.scan is not None and hp.unlearn_tsft else None
        tried = []
        for i, lr in enumerate(lower):
            start = time.perf_counter()
            teacher = self.probe(copy.deepcopy(self.model), lr=lr, epochs=hp.tsft_epochs, schedule=hp.tsft_schedule,
                                 seed=(self.trainer.max_epochs + 1 + i) * SEED_STRIDE, prepare=prepare,
                                 progress=f"TS-FT again at rate {lr:g}")
            report = self.dev_report(teacher)
            reason = collapse_reason(report, hp.max_class_share, self.min_cacc)
            tried.append({"lr": lr, **report, "accepted": reason is None, "seconds": round(time.perf_counter() - start, 1)})
            log.warning("TS-FT teacher again at rate %g: dev CACC %.2f, class shares %s -> %s", lr, report["cacc"],
                        report["shares"], reason or "accepted")
            if reason is None:
                self.teacher.load_state_dict(teacher.state_dict())
                break
            del teacher
        accepted = next((t for t in tried if t["accepted"]), None)
        chosen = accepted["lr"] if accepted else None
        self.report["teacher_backoff"] = {"failed": {"lr": failed, **first}, "min_cacc": self.min_cacc, "tried": tried,
                                          "chosen": chosen}
        self.report.setdefault("plan", []).append({
            "step": "TS-FT teacher trained again at a lower rate", "taken": chosen is not None,
            "why": f"the teacher at {failed:g} failed the guard on clean dev ({why}); "
                   + (f"at {chosen:g} it passed" if chosen is not None else "no lower rate passed")})
        if accepted is None:
            return first
        return {k: v for k, v in accepted.items() if k not in ("lr", "accepted", "seconds")}

    def on_train_end(self) -> None:
        if self.hparams.get("live_flip") is None:
            self.report["student_dev"] = self.guard("the MBTSAD student", self.model)
        else:
            if self.trainer.is_global_zero:
                self._choose_export()
            if self.distributed:  # rank 0's choice, and the exported weights, everywhere
                self._take_rank_zero_choices()
            choice = self.report["export_choice"]
            self.report["student_dev"] = choice["student"]["dev"]
            name = "the TS-FT teacher (exported in the student's place)" if choice["exported"] == "teacher" else "the MBTSAD student"
            self.guard(name, self.model, choice[choice["exported"]]["dev"])
        if self.hparams.get("rescan") and self.trainer.is_global_zero:
            self._rescan()

    def _flip_rates(self, model) -> list[float]:
        """The found triggers' flip rates on the clean dev data for ``model`` (``trigger_flip_rates``)."""
        dm = self.trainer.datamodule
        seed = (self.scan or self.inversion or TriggerInversion()).seed
        return trigger_flip_rates(model, dm.tokenizer, dm.examples("dev"), self._suspects(), seed)

    def _evidence(self, model, report: dict | None = None) -> dict:
        """A candidate output's clean-dev evidence: its dev report, why the collapse guard would
        refuse it (or None), the found triggers' flip rates and those still live on it."""
        report = self.dev_report(model) if report is None else report
        flips = self._flip_rates(model)
        return {"dev": report, "collapse": collapse_reason(report, self.hparams.max_class_share, self.min_cacc),
                "flips": flips, "live": live_triggers([s.text for s in self._suspects()], flips, self.hparams.live_flip)}

    def _choose_export(self) -> None:
        """The output, student or teacher, from clean-dev evidence alone (``live_flip``,
        ``export_choice.choose_output``). The teacher's weights then replace the student's, so
        the export, the test and the model card all read the model chosen."""
        start = time.perf_counter()
        student = self._evidence(self.model)
        choice = {"live_flip": self.hparams.live_flip, "suspects": [s.text for s in self._suspects()], "student": student}
        teacher = self._evidence(self.teacher, self.report.get("teacher_dev")) if needs_teacher(student) else None
        if teacher is not None:
            choice["teacher"] = teacher
        exported, why = choose_output(student, teacher, fits=teacher is not None and self._same_architecture())
        if exported == "teacher":
            self.model.load_state_dict(self.teacher.state_dict())
        choice.update(exported=exported, why=why, seconds=round(time.perf_counter() - start, 1))
        self.report["export_choice"] = choice
        self.report.setdefault("plan", []).append({"step": "the TS-FT teacher exported in the student's place",
                                                   "taken": exported == "teacher", "why": why})
        log.info("export choice: the %s (%s)", exported, why)

    def _same_architecture(self) -> bool:
        """Whether the teacher's weights can replace the student's (a given teacher may differ)."""
        mine, theirs = self.model.state_dict(), self.teacher.state_dict()
        return mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)

    def _rescan(self) -> None:
        """The found triggers' flip rates on clean dev, suspicious model and cleaned model (the
        output: the student, or the teacher the export choice put in its place), and a fresh
        trigger inversion of the cleaned model."""
        dm = self.trainer.datamodule
        start = time.perf_counter()
        suspects = self._suspects()
        dev = dm.examples("dev")
        before = self._flip_rates(self.suspicious)
        choice = self.report.get("export_choice")
        after = choice[choice["exported"]]["flips"] if choice else self._flip_rates(self.model)
        out = {"found": [{"text": s.text, "label": s.label, "suspicious": b, "cleaned": a} for s, b, a in zip(suspects, before, after)]}
        if self.inversion is not None:
            again = scan_checkpoint(self.model, dm.tokenizer, dev, dev + dm.clean_subset, None, self.inversion)
            out["inversion_after"] = again["inversion"]
            out["suspected_after"] = again["suspected"]
        out["seconds"] = round(time.perf_counter() - start, 1)
        self.report["rescan"] = out
        log.info("re-scan: found triggers' flip rate %s -> %s", before, after)

    def _transform_start(self, transform) -> dict:
        """A weight transform (E-PUR, Fine-mixing) on the weights both training phases start from
        (the student and, when it is trained here, the teacher); what it chose."""
        dm = self.trainer.datamodule
        reference = self.reference_weights()
        rates = self.hparams.tsft_lr
        # the transform's probes fine-tune at the distillation's rate, or the mildest TS-FT candidate
        probe_lr = self.hparams.lr or (min(rates) if isinstance(rates, (list, tuple)) else rates)

        ctx = TransformContext(
            model=self.model, reference=reference, suspicious_dev_cacc=score(self.report["suspicious_dev"]),
            dev_report=self.dev_report, probe=lambda m, epochs: self.probe(m, epochs=epochs, lr=probe_lr),
            clean_batches=self.clean_batches, clean_texts=[ex.text for ex in dm.clean_subset],
            tokenizer=dm.tokenizer, max_length=dm.hparams.max_length,
        )
        chosen = {"name": repr(transform), **transform.apply(ctx)}
        if self.hparams.teacher is None:
            self.teacher.load_state_dict(self.model.state_dict())
        return chosen

    def _scan_for_triggers(self) -> None:
        """The word scan and the trigger inversion (those set) on the suspicious model, with the
        clean dev data; the suspects and the per-label verdict go to the report."""
        dm = self.trainer.datamodule
        start = time.perf_counter()
        dev = dm.examples("dev")
        clean_model = None
        if self.control is not None and self.hparams.reference is not None:
            # the plain clean data: the training loader may hold its token-split augmentation
            loader = dm.train_dataloader(one_process=True, name="clean_subset")
            clean_model = self.control.train(self.hparams.reference, self.hparams.num_labels, loader,
                                             self.suspicious.config.vocab_size, batches_per_epoch=self.batches_per_epoch(loader),
                                             device=self.device, allow_pickle=self.hparams.allow_pickle,
                                             show_progress=self.trainer.is_global_zero)
        natural_flip = self.control.natural_flip if self.control is not None else 0.5
        result = scan_checkpoint(self.suspicious, dm.tokenizer, dev, dev + dm.clean_subset, self.scan, self.inversion,
                                 control=clean_model, natural_flip=natural_flip)
        del clean_model
        suspects = result["suspects"]
        rows = [{**r, "found_by": "word scan"} for r in result.get("word_scan", [])]
        rows += [{**r, "found_by": "inversion"} for r in result.get("inversion", [])]
        self.report["trigger_scan"] = {
            "settings": {**(self.scan.settings() if self.scan else {}), **({"inversion": self.inversion.settings()} if self.inversion else {})},
            "suspects": [s.text for s in suspects], "suspect_ids": [list(s.token_ids) for s in suspects],
            "suspect_labels": [s.label for s in suspects], "verdict": result["labels"], "verified": rows,
            "prior_removed": result["prior"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        if "control" in result:
            self.report["trigger_scan"]["control"] = result["control"]
        if self.scan is not None and self.scan.unlearn_neighbours:
            support = dev + dm.clean_subset
            self.report["trigger_scan"]["neighbours"] = embedding_neighbours(
                self.suspicious, dm.tokenizer, suspects, self.scan.unlearn_neighbours, [e.text for e in support],
                [e.label for e in support], self.scan.support_lift)
        log.info("trigger scan: %d suspects %s (%.0f s)", len(suspects), [s.text for s in suspects],
                 self.report["trigger_scan"]["seconds"])

    def _suspects(self) -> list[Suspect]:
        """The found triggers as ``Suspect`` records (text, ids and label from the report)."""
        scan = self.report.get("trigger_scan", {})
        return [Suspect(t, tuple(ids), c, 0.0, 0.0, 0, 0.0) for t, ids, c in
                zip(scan.get("suspects", []), scan.get("suspect_ids", []), scan.get("suspect_labels", []))]

    def _suspect_ids(self) -> list[list[int]]:
        """The token ids unlearned (one list per token or phrase): the suspects', then their
        embedding neighbours' (``scan.unlearn_neighbours``), each once."""
        return unlearning_ids(self.report.get("trigger_scan", {}))

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
        # the schedules' lengths, once the checkpoint is restored (see mitigate.training.LinearDecay)
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
            batch, rows = self.scan.unlearning_batch(batch, self._suspect_ids(), self.global_step, pad,
                                                     rank=self.global_rank, world=self.trainer.world_size)
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
            samples, tokens = self._global_normalisers(mask[keep])  # every process, before any skips
            if keep.any():
                width = int(mask[keep].sum(1).max())  # the inserted rows' extra columns are not needed
                k_ids, k_mask = ids[keep, :width], mask[keep, :width]
                kw = dict(input_ids=k_ids, attention_mask=k_mask,
                          output_attentions=lf.needs_attentions, output_hidden_states=lf.needs_hidden_states)
                with torch.no_grad():
                    t_out = self.teacher(**kw)
                terms = lf(t_out, self.model(**kw), labels[keep], k_mask, samples, tokens)
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

    def _global_normalisers(self, mask: torch.Tensor) -> tuple[float | None, float | None]:
        """Under DDP, the global batch's distilled samples and real tokens over the number of
        processes: the processes' averaged gradient is then that of one process on the global
        batch, however the inserted rows split between processes. (None, None) on one process."""
        world = self.trainer.world_size
        if world == 1 or not dist.is_available() or not dist.is_initialized():
            return None, None
        counts = torch.tensor([float(len(mask)), float(mask.sum())], dtype=torch.float64, device=mask.device)
        dist.all_reduce(counts)
        return float(counts[0]) / world, float(counts[1]) / world

    # -- evaluation -----------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        model = self.teacher if self.in_tsft else self.model
        preds = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        self.val_metrics.update(preds, batch["labels"], batch["poisoned"])
        self.log_dict(self.val_metrics.loggable(), add_dataloader_idx=False, batch_size=len(preds))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)

    def card(self, datamodule) -> dict:
        """The model card's title, text and tags: MBTSAD's steps and what the scan found."""
        hp = self.hparams
        text = (f"The suspicious checkpoint `{hp.model}` went through MBTSAD: token-splitting retraining of a copy "
                f"(the teacher, {hp.tsft_epochs} epoch(s)), then attention distillation into the checkpoint itself "
                f"(alpha {hp.alpha}, beta {hp.beta}, p {hp.p}).")
        scan = self.report.get("trigger_scan")
        if scan is not None:
            text += (f" A scan of the vocabulary on clean held-out data found {len(scan['suspects'])} suspect "
                     f"token(s) ({', '.join(scan['suspects']) or 'none'}), which the training taught the model to ignore.")
        choice = self.report.get("export_choice")
        if choice and choice["exported"] == "teacher":
            text += (f" This model is the TS-FT teacher, exported in the distilled student's place from clean held-out "
                     f"evidence: {choice['why']}.")
        return {"title": "Backdoor mitigation with MBTSAD", "tags": ["backdoor-mitigation", "mbtsad"], "text": text}
