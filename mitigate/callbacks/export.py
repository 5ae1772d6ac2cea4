"""Exporting the trained model as a Hugging Face checkpoint (safetensors + tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class ExportPretrained(pl.Callback):
    """At the end of ``fit``, ``save_pretrained`` the module's ``model`` and the data module's
    tokenizer into ``dirpath`` (default ``<default_root_dir>/model``): a folder that
    ``from_pretrained`` (and ``mitigate``) load like any downloaded checkpoint. A module with a
    ``teacher`` (MBTSAD) has it exported beside, into ``teacher/``."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.default_root_dir) / "model")
        models = {out: pl_module.model}
        if isinstance(getattr(pl_module, "teacher", None), PreTrainedModel):
            models[out.with_name("teacher")] = pl_module.teacher
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        for folder, model in models.items():
            model.save_pretrained(folder)  # safetensors
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            log.info("exported %s to %s", type(model).__name__, folder)
