"""Exporting the trained model as a Hugging Face checkpoint (safetensors + tokenizer), once the
collapse guard has checked it on the clean held-out data."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from transformers import PreTrainedModel

from mitigate.guard import collapse_reason
from mitigate.inference import clean_report
from mitigate.run.model_card import describe, write_model_card
from mitigate.run.results import test_coverage

log = logging.getLogger(__name__)


class ExportPretrained(pl.Callback):
    """At the end of ``fit``, ``save_pretrained`` the module's ``model`` and the data module's
    tokenizer into ``dirpath`` (default ``<default_root_dir>/model``): a folder that
    ``from_pretrained`` (and ``mitigate``) load like any downloaded checkpoint. A module with a
    ``teacher`` (MBTSAD) has it exported beside, into ``teacher/``. Each folder gets a model card
    (README.md: what was done, settings, clean data, results once tested, what was not measured).

    The collapse guard comes first: a model that predicts one class for at least
    ``max_class_share`` of the clean held-out (dev) samples is not exported
    (``max_class_share: null`` turns this check off), nor is the model of a mitigation whose own
    guard fired during training. The run still tests what it trained: results.json and
    results.md say "not exported" and why, and the command then ends with an error.

    Args:
        dirpath: the export folder (default ``<default_root_dir>/model``).
        max_class_share: the one-class share of clean dev predictions that refuses the export.
    """

    def __init__(self, dirpath: str | None = None, max_class_share: float | None = 0.95) -> None:
        self.dirpath = dirpath
        self.max_class_share = max_class_share
        #: why the export was refused (None: exported, or no fit ran)
        self.refused: str | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "model")
        models = {out: pl_module.model}
        if isinstance(getattr(pl_module, "teacher", None), PreTrainedModel):
            models[out.with_name("teacher")] = pl_module.teacher
        dm = trainer.datamodule
        self.refused = self._refusal(pl_module, dm, models)  # every rank decides alike (same data)
        if self.refused:
            pl_module.report = {**(getattr(pl_module, "report", None) or {}),
                                "export": {"exported": False, "reason": self.refused}}
            log.error("%s; the test still runs and results.json says so", self.refused)
            return
        if not trainer.is_global_zero:
            return
        tokenizer = getattr(dm, "tokenizer", None)
        info = describe(pl_module, dm)
        self._cards = {}
        for folder, model in models.items():
            model.save_pretrained(folder)  # safetensors
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            card = info if folder == out else {**info, "title": f"{info['title']}: the TS-FT teacher (an intermediate model)"}
            self._cards[folder] = card
            write_model_card(folder, card)
            log.info("exported %s to %s", type(model).__name__, folder)

    def _refusal(self, pl_module, dm, models: dict) -> str | None:
        """Why the trained models must not be exported, or None."""
        collapsed = (getattr(pl_module, "report", None) or {}).get("collapse")
        if collapsed:
            return f"collapse guard: not exported: {collapsed[0]['message']}"
        encoder_only = getattr(pl_module, "exports_encoder", False)  # POR / NeuBA: no head to check
        if self.max_class_share is None or encoder_only or dm is None or not len(dm.dataset("dev")):
            return None
        for folder, model in models.items():
            report = clean_report(model, dm.dataset("dev"), dm.tokenizer.pad_token_id)
            reason = collapse_reason(report, self.max_class_share)
            if reason:
                return (f"collapse guard: the trained {folder.name} is not exported: {reason} "
                        f"(dev CACC {report['cacc']:.2f}); lower the learning rate or check the data")
        return None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The test after fit: the model cards get the results table."""
        if not trainer.is_global_zero or not getattr(self, "_cards", None):
            return
        results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        coverage = test_coverage(trainer)
        for folder, card in self._cards.items():
            write_model_card(folder, card, results, getattr(pl_module, "report_rows", None), coverage)
