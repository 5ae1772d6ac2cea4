"""Progress as log lines when nobody watches a terminal (nohup, a batch scheduler, CI), where
Lightning's progress bars print nothing: epoch, step/total, loss, samples/s, elapsed time and
time left, every ``every_s`` seconds and at each epoch's end. Long loops outside the trainer
(defense calibration, ONION, the trigger scan) use ``LogProgress``."""

from __future__ import annotations

import logging
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from tqdm.auto import tqdm

log = logging.getLogger("mitigate.progress")


def interactive() -> bool:
    """Whether a person watches stderr (a terminal): bars there, log lines elsewhere."""
    return sys.stderr.isatty()


class EpochBar(RichProgressBar):
    """Lightning's rich progress bar counting epochs from 1, as the progress log lines do
    ("Epoch 1/3" for the first of three; Lightning's own bar says "Epoch 0/2")."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch + 1}" + (f"/{self.trainer.max_epochs}" if self.trainer.max_epochs not in (None, -1) else "")
        width = len(self.validation_description)
        return f"{text:{width}}" if width > len(text) else text  # as Lightning's: no flicker beside "Validation"


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLog(pl.Callback):
    """A log line every ``every_s`` seconds of training and at each epoch's end, when stderr is
    not a terminal (``always: true`` logs in a terminal too). Rank 0 only.

    Args:
        every_s: seconds between two progress lines.
        always: write them in a terminal too (beside the progress bar).
    """

    def __init__(self, every_s: float = 60.0, always: bool = False) -> None:
        self.every_s, self.always = every_s, always
        self._active = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = trainer.is_global_zero and (self.always or not interactive())
        self._start = self._last = time.perf_counter()
        self._first_step = trainer.global_step
        self._samples = 0

    def _line(self, trainer: pl.Trainer, what: str) -> None:
        now = time.perf_counter()
        total = trainer.estimated_stepping_batches
        step, done = trainer.global_step, trainer.global_step - self._first_step
        elapsed = now - self._start
        left = elapsed / done * (total - step) if done else float("nan")
        loss = trainer.callback_metrics.get("train/loss", trainer.callback_metrics.get("train/tsft_loss"))
        loss_s = f"loss {float(loss):.4f}, " if loss is not None else ""
        log.info(
            "%s epoch %d/%d, step %d/%d (%.0f%%), %s%.1f samples/s, elapsed %s, left %s",
            what, trainer.current_epoch + 1, trainer.max_epochs or 0, step, total, 100 * step / max(1, total), loss_s,
            self._samples / max(1e-9, elapsed), _hms(elapsed), _hms(left) if left == left else "?",
        )
        self._last = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += len(batch["labels"]) if isinstance(batch, dict) and "labels" in batch else 0
        if self._active and time.perf_counter() - self._last >= self.every_s:
            self._line(trainer, "train:")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._line(trainer, "end of")


class LogProgress:
    """A tqdm bar in a terminal; elsewhere a log line every ``every_s`` seconds (done/total,
    rate, time left). Context manager with ``update(n)``, like tqdm."""

    def __init__(self, total: int, desc: str, every_s: float = 60.0, enabled: bool = True) -> None:
        self.total, self.desc, self.every_s, self.enabled = total, desc, every_s, enabled
        self.done = 0
        self.bar = tqdm(total=total, desc=desc, leave=False) if enabled and interactive() else None
        self._start = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        """``n`` more done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.every_s or self.done >= self.total):
            rate = self.done / max(1e-9, now - self._start)
            log.info("%s: %d/%d (%.0f%%), %.1f/s, elapsed %s, left %s", self.desc, self.done, self.total,
                     100 * self.done / max(1, self.total), rate, _hms(now - self._start), _hms((self.total - self.done) / max(rate, 1e-9)))
            self._last = now

    def close(self) -> None:
        """Remove the bar (log lines need no closing)."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
