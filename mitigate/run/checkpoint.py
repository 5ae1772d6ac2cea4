"""The run's checkpoints: every ``every_n_train_steps`` steps, at each epoch's end, and the final
state when training ends, with ``last.ckpt`` always naming the latest."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves at the end of every epoch and of training when it
    saves every n steps.

    Lightning makes ``every_n_train_steps`` and ``every_n_epochs`` exclusive, and with
    ``save_last: link`` the link then keeps pointing at the last n-step checkpoint: a 60-step
    run saving every 50 steps ended with ``last.ckpt`` at step 50. Here a checkpoint is also
    written (and ``last.ckpt`` linked to it) whenever an epoch or the training ends on a step
    that has none yet, so ``--ckpt_path last`` always resumes from the latest state."""

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
