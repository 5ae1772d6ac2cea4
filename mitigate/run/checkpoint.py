"""The run's checkpoints: every ``every_n_train_steps`` steps, at each epoch's end, and the final
state when training ends, with ``last.ckpt`` always naming the latest."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves at the end of every epoch and of training when it
    saves every n steps.

    Lightning makes ``every_n_train_steps`` and ``every_n_epochs`` exclusive, and with
    ``save_last: link`` the link then keeps pointing at the last n-step checkpoint: a 60-step
    run saving every 50 steps ended with ``last.ckpt`` at step 50. Here a checkpoint is also
    written (and ``last.ckpt`` linked to it) whenever an epoch or the training ends on a step
    that has none yet, so ``--ckpt_path last`` always resumes from the latest state.

    When training ends, the checkpoints a finished run no longer needs are removed: a killed
    run resumes from them, a finished one has its exported model (MiniLM's checkpoint, weights
    and optimizer state, is 270 MB).

    Args:
        keep: what stays once training has ended: ``none`` (the exported model is the result),
            ``last`` (the final state, to extend the run with ``--ckpt_path last``) or ``all``.
    """

    def __init__(self, keep: Literal["last", "all", "none"] = "none", **kwargs) -> None:
        super().__init__(**kwargs)
        if keep not in ("last", "all", "none"):
            raise ValueError(f"checkpoint.keep must be last, all or none, got {keep!r}")
        self.keep = keep

    def _save_latest(self, trainer: pl.Trainer) -> None:
        if not self._every_n_train_steps or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_latest(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_latest(trainer)
        super().on_train_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the checkpoints ``keep`` does not keep (a killed run never gets here)."""
        if self.keep == "all" or not trainer.is_global_zero or not self.dirpath or not Path(self.dirpath).is_dir():
            return
        folder = Path(self.dirpath)
        last = folder / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        kept = {last, last.resolve()} if self.keep == "last" and last.exists() else set()
        for f in folder.iterdir():
            if f.suffix == self.FILE_EXTENSION and f not in kept and f.resolve() not in kept:
                f.unlink()
