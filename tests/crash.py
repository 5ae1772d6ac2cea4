"""A callback that kills the process without any cleanup, as an OOM kill or a lost node would."""

import os

import lightning.pytorch as pl


class HardCrash(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os._exit(137)
