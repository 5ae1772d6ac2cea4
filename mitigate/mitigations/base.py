"""``Mitigation``: what every mitigation shares. A suspicious checkpoint goes in, a cleaned
checkpoint comes out, and the test reports both side by side; every setting that must differ
between checkpoints is chosen inside the run from the defender's clean data, and the choice is
reported and survives a resume."""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from mitigate.classifier import TextClassifier
from mitigate.guard import collapse_reason, metric_name, score
from mitigate.inference import clean_report
from mitigate.loading import load_reference
from mitigate.metrics import BackdoorMetrics
from mitigate.training import SEED_STRIDE, fine_tune

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("classifier.", "score.")


def is_head(name: str) -> bool:
    """Whether parameter ``name`` belongs to the classification head (no pre-trained counterpart)."""
    return name.startswith(HEAD_PREFIXES)


def reference_state(model: nn.Module, reference: nn.Module, missing=(), source: str = "reference") -> dict[str, torch.Tensor]:
    """The reference (pre-trained) tensors under the suspicious ``model``'s names, for every
    parameter except the classification head. ``reference`` is the same architecture loaded
    from the pre-trained checkpoint (its head freshly initialised); ``missing`` the names the
    checkpoint did not hold (from ``output_loading_info``). Any parameter of the model without
    a pre-trained counterpart of the same shape is refused: the methods that read it need the
    very checkpoint the victim was fine-tuned from (the MBTSAD paper's point about modified
    architectures)."""
    ours = dict(model.named_parameters())
    theirs = dict(reference.named_parameters())
    missing = set(missing)
    problems = []
    for name, p in ours.items():
        if is_head(name):
            continue
        if name not in theirs or name in missing:
            problems.append(f"{name} is not in it")
        elif theirs[name].shape != p.shape:
            problems.append(f"{name} has shape {tuple(theirs[name].shape)} there, {tuple(p.shape)} in the suspicious model")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{source}: does not match the suspicious model: {'; '.join(problems[:3])}{more}")
    return {n: theirs[n].detach().clone() for n in ours if not is_head(n)}


class Mitigation(TextClassifier):
    """Base of the mitigations (MBTSAD, the weight-space methods): a suspicious checkpoint in, a
    cleaned one out.

    - ``self.model`` is the suspicious checkpoint as loaded; the method trains or transforms it
      into the cleaned model, which ``fit`` exports.
    - ``self.suspicious`` is a frozen copy, tested beside it (``test/suspicious/*``); the
      models in ``evaluated`` are all tested on the same batches (``test/<name>/*``, the
      cleaned model under ``test/*``).
    - ``self.report`` holds what the run chose on clean data. It is saved in every checkpoint
      (a resumed run does not choose again) and written to results.json / results.md.
    - ``prepare()`` is the method's one-time work before training (scans, choices, weight
      transforms); it runs once, after the suspicious model's clean-dev report, and is skipped
      when the run resumes. Under DDP it runs on rank 0 alone, on the global batches of one
      process (``probe`` and ``clean_batches`` see them), and every process then takes its
      report, state and weights: each decision is made once and is the same everywhere.
      ``apply_choices()`` then runs on every process (and after a resume), to set what lives
      outside the weights (e.g. optimizer learning rates).
    - ``reference_weights()``, ``dev_report()``, ``probe()`` and ``guard()`` serve them.

    Args:
        model: the suspicious checkpoint (hub id or folder, safetensors).
        num_labels: number of classes (the CLI links it to the data).
        lr: learning rate of the method's training.
        weight_decay: AdamW weight decay.
        schedule: ``constant`` learning rate, or ``linear`` decay to 0 after the warm-up.
        warmup_ratio: share of the steps with a linear warm-up (``linear`` schedule).
        reference: the clean pre-trained checkpoint the suspicious model was fine-tuned from
            (hub id or folder, the same safe loader), for the methods that read it; names and
            shapes are checked against the suspicious model.
        max_cacc_drop: the collapse guard's accuracy bound: a model ``guard`` checks must stay
            within this many points of the suspicious model's clean-dev accuracy (None: no bound).
        max_class_share: the collapse guard: a checked model must not predict one class for this
            share of the clean dev set (None: not checked).
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    #: models tested beside the cleaned one: attribute name -> results.md row (the cleaned model
    #: is "model", reported under ``test/*``)
    evaluated: dict[str, str] = {"suspicious": "suspicious model", "model": "cleaned"}
    def guard_hint(self, name: str) -> str:
        """What to change when the collapse guard fires on the model called ``name`` (appended
        to its message)."""
        return "lower model.lr"

    def __init__(
        self,
        model: str,
        num_labels: int = 2,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        warmup_ratio: float = 0.0,
        reference: str | None = None,
        max_cacc_drop: float | None = None,
        max_class_share: float | None = 0.95,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(model, num_labels, lr, weight_decay, schedule, warmup_ratio, allow_pickle)
        self.suspicious = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.test_metrics = nn.ModuleDict({
            name: BackdoorMetrics(num_labels, "test/" if name == "model" else f"test/{name}/") for name in self.evaluated
        })
        #: what the run chose on clean data (checkpointed; written to results.json / .md)
        self.report: dict = {}
        #: the method's own state during training (e.g. pruned units; checkpointed)
        self.state: dict = {}

    @property
    def report_rows(self) -> dict[str, str]:
        """results.md's row label per metric prefix ("" for the cleaned model), in order."""
        return {("" if name == "model" else name): label for name, label in self.evaluated.items()}

    # -- before training -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.check_trainer()
        if "suspicious_dev" not in self.report:  # resumed: the choices are in the checkpoint
            if self.trainer.is_global_zero:
                self.report["suspicious_dev"] = self.dev_report(self.suspicious)
                self.prepare()
            if self.distributed:
                self._take_rank_zero_choices()
        self.apply_choices()

    @property
    def distributed(self) -> bool:
        """Whether this run has several processes (the choices are then made on rank 0)."""
        return self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _take_rank_zero_choices(self) -> None:
        """Rank 0's report, state and weights on every process."""
        self.report, self.state = self.trainer.strategy.broadcast((self.report, self.state), src=0)
        with torch.no_grad():
            for tensor in self.state_dict().values():
                dist.broadcast(tensor, src=0)

    def check_trainer(self) -> None:
        """Refuse trainer settings the method cannot run with (every start, resumes too)."""

    def prepare(self) -> None:
        """The method's one-time work before training (choices on clean data, transforms); rank 0
        only under DDP."""

    def apply_choices(self) -> None:
        """Set what the choices decide outside the weights, on every process (after ``prepare``,
        or from the restored report when the run resumes)."""

    def clean_batches(self) -> list[dict]:
        """The defender's clean training data in batches: the global batches of one process
        (the training's own order), as many as the trainer's ``limit_train_batches`` lets an
        epoch have."""
        loader = self.trainer.datamodule.train_dataloader(one_process=True)
        return list(itertools.islice(loader, self.batches_per_epoch(loader)))

    def batches_per_epoch(self, loader) -> int:
        """Batches of ``loader`` an epoch trains on, under the trainer's ``limit_train_batches``
        (an int: that many; a float: that share); probes and scans take no more."""
        limit = self.trainer.limit_train_batches
        if limit is None:
            return len(loader)
        if isinstance(limit, int) or (isinstance(limit, float) and limit > 1.0):
            return min(len(loader), int(limit))
        return max(1, int(len(loader) * limit))

    # -- services --------------------------------------------------------------------------------
    def reference_weights(self) -> dict[str, torch.Tensor]:
        """The clean pre-trained tensors of ``reference`` under the suspicious model's names (the
        head excepted), on the model's device; refused when any does not match."""
        hp = self.hparams
        if hp.reference is None:
            raise ValueError(f"{type(self).__name__} needs the clean pre-trained weights: set model.init_args.reference")
        ref, missing = load_reference(hp.reference, hp.num_labels, hp.allow_pickle)
        state = reference_state(self.model, ref, missing, f"reference {hp.reference}")
        return {k: v.to(self.device) for k, v in state.items()}

    def dev_report(self, model: nn.Module) -> dict:
        """Clean-dev accuracy (%) and class shares of ``model`` (``mitigate.inference.clean_report``)."""
        dm = self.trainer.datamodule
        return clean_report(model, dm.dataset("dev"), dm.tokenizer.pad_token_id)

    def weak_suspicious_model(self) -> str | None:
        """What is wrong with the suspicious model itself on clean dev data (it predicts nearly
        one class, or is within 5 points of chance), or None: when the victim is the problem, the
        guard says so instead of blaming the cleaning's settings."""
        dev = self.report.get("suspicious_dev")
        if not dev:
            return None
        reason = collapse_reason(dev, self.hparams.max_class_share or 0.95)
        if reason:
            return reason.replace("it predicts", "predicts")
        chance = 100.0 / len(dev["shares"])
        if dev["cacc"] < chance + 5.0:
            return f"is near chance on clean dev data (CACC {dev['cacc']:.2f}, chance {chance:.0f})"
        return None

    @property
    def min_cacc(self) -> float | None:
        """The clean-dev bound: the suspicious model's accuracy (macro-F1 on an imbalanced task,
        ``mitigate.guard``) minus ``max_cacc_drop``."""
        drop = self.hparams.max_cacc_drop
        return None if drop is None else score(self.report["suspicious_dev"]) - drop

    def guard(self, name: str, model: nn.Module, report: dict | None = None) -> dict:
        """Clean-dev report of ``model`` (``report``, when already measured on these weights).
        When it predicts one class for ``max_class_share`` of dev or falls below ``min_cacc``,
        the collapse is recorded in the report (``report["collapse"]``), training stops, and the
        export refuses the model; the test still runs, so the numbers of the failed cleaning are
        kept."""
        report = self.dev_report(model) if report is None else report
        reason = collapse_reason(report, self.hparams.max_class_share, self.min_cacc)
        if reason:
            weak = self.weak_suspicious_model()
            fix = self.guard_hint(name)
            hint = (f"The suspicious model itself {weak}: check the checkpoint and the data before the cleaning"
                    if weak else f"{fix[0].upper()}{fix[1:]}")
            dev = self.report["suspicious_dev"]
            message = (f"{name} is not a usable cleaning: {reason} (suspicious model: dev {metric_name(dev)} "
                       f"{score(dev):.2f}). {hint}")
            self.report.setdefault("collapse", []).append({"model": name, "message": message, **report})
            log.error("collapse guard: %s", message)
            self.trainer.should_stop = True
        return report

    def probe(self, model: nn.Module, *, lr: float | None = None, epochs: int = 1, max_steps: int | None = None,
              schedule: str | None = None, seed: int = SEED_STRIDE, prepare=None, after_step=None,
              progress: str = "probe fine-tune") -> nn.Module:
        """``model`` fine-tuned in place on the clean training data (the run's own loader, AdamW
        at ``lr`` (default: the run's), the run's schedule unless ``schedule`` is given), the
        short run that judges a candidate setting (``mitigate.training.fine_tune``)."""
        hp = self.hparams
        loader = self.trainer.datamodule.train_dataloader(one_process=True)
        return fine_tune(
            model, loader, lr=hp.lr if lr is None else lr, weight_decay=hp.weight_decay, epochs=epochs, max_steps=max_steps,
            batches_per_epoch=self.batches_per_epoch(loader), schedule=schedule or hp.schedule, warmup_ratio=hp.warmup_ratio, seed=seed,
            prepare=prepare, after_step=after_step, device=self.device, progress=progress,
            show_progress=self.trainer.is_global_zero,
        )

    # -- checkpoints and evaluation --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mitigate_report"] = self.report
        checkpoint["mitigate_state"] = self.state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.report = checkpoint.get("mitigate_report", {})
        self.state = checkpoint.get("mitigate_state", {})

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        for name, metrics in self.test_metrics.items():
            model = getattr(self, name)
            preds = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
            metrics.update(preds, batch["labels"], batch["poisoned"])
            self.log_dict(metrics.loggable(), add_dataloader_idx=False, batch_size=len(preds))
