"""`mitigate predict` output: one CSV row per input with the predicted label and probabilities."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (``predictions.rank<R>.csv`` under DDP) into ``dirpath``:
    text, label, predicted label and one probability column per class, in the data's order."""

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.dirpath = dirpath

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module, predictions, batch_indices) -> None:
        probs = torch.cat(predictions).float()
        order = [i for batch in batch_indices[0] for i in batch] if batch_indices else list(range(len(probs)))
        examples = trainer.datamodule.datasets["test"].examples
        rows = sorted(zip(order, probs.tolist()))
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions.rank{trainer.global_rank}.csv"
        out = Path(self.dirpath or trainer.default_root_dir) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label", "pred", *[f"p{c}" for c in range(probs.shape[1])]])
            for i, p in rows:
                w.writerow([examples[i].text, examples[i].label, max(range(len(p)), key=p.__getitem__), *(f"{x:.6f}" for x in p)])
