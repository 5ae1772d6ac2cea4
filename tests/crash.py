"""Callbacks for tests run as subprocesses: a kill without any cleanup (as an OOM kill or a lost
node would), and a record of each process's choices."""

import json
import os
from pathlib import Path

import lightning.pytorch as pl


def checksum(model) -> float:
    """The sum of every weight of ``model`` (float64): equal weights, equal sums."""
    return sum(float(t.double().sum()) for t in model.state_dict().values())


class HardCrash(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os._exit(137)


class RecordChoices(pl.Callback):
    """Writes each process's report (its choices) when training starts, to ``choices.rank<R>.json``."""

    def on_train_start(self, trainer, pl_module) -> None:
        out = Path(trainer.default_root_dir) / f"choices.rank{trainer.global_rank}.json"
        out.write_text(json.dumps({k: v for k, v in pl_module.report.items()}, sort_keys=True, default=str))


class RecordTeacher(pl.Callback):
    """Writes each process's teacher back-off record, a checksum of its teacher's weights and the
    step when the distillation starts, to ``teacher.rank<R>.json``."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != pl_module.hparams.tsft_epochs:
            return
        total = checksum(pl_module.teacher)
        out = Path(trainer.default_root_dir) / f"teacher.rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"backoff": pl_module.report.get("teacher_backoff"), "checksum": total, "step": trainer.global_step,
                                   "rates": pl_module.report.get("learning_rates")}, sort_keys=True, default=str))


class RecordExport(pl.Callback):
    """Writes each process's export choice and checksums of its output and teacher weights when
    fit ends (after the module's end-of-training choice), to ``export.rank<R>.json``."""

    def on_fit_end(self, trainer, pl_module) -> None:
        choice = {k: v for k, v in (pl_module.report.get("export_choice") or {}).items() if k != "seconds"}
        out = Path(trainer.default_root_dir) / f"export.rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"choice": choice, "model": checksum(pl_module.model), "teacher": checksum(pl_module.teacher),
                                   "collapse": pl_module.report.get("collapse")}, sort_keys=True, default=str))
