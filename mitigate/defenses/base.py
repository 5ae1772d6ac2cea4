"""What every test-time defense callback shares: calibration before the test loop, defending
each test batch, timing, metrics synced across DDP ranks, and a per-sample CSV."""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from mitigate.data.io import Example
from mitigate.run import plots
from mitigate.run.progress import LogProgress

log = logging.getLogger(__name__)


# -- helpers ----------------------------------------------------------------------------------
def world(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(number of processes, this one's rank); (1, 0) when not distributed."""
    if trainer is None or trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return trainer.world_size, trainer.global_rank


def gather_objects(trainer: pl.Trainer, obj) -> list:
    """``obj`` of every rank, in rank order (one element when not distributed)."""
    n, _ = world(trainer)
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj)
    return out


def gather_cat(trainer: pl.Trainer, t: torch.Tensor) -> torch.Tensor:
    """Concatenation of a 1-d tensor of every rank (sizes may differ)."""
    return torch.cat([x.cpu() for x in gather_objects(trainer, t.detach().cpu())])


def percentile_threshold(scores: torch.Tensor, percent: float) -> float:
    """The ``percent``-th percentile of ``scores`` (e.g. 1 -> 1% of clean samples fall below)."""
    if scores.numel() == 0:
        raise ValueError("no calibration scores: the clean held-out set is empty")
    return float(torch.quantile(scores.double(), percent / 100.0))


#: forward-pass batch sizes per device type when a defense is given none (measured on the 2-core
#: CPU: many short sequences run faster in batches of 32 than of 256; a GPU wants large batches)
DEVICE_BATCH_SIZES = {"cpu": 32, "cuda": 256}


def device_batch_size(device) -> int:
    """The default forward-pass batch size on ``device``'s type (``DEVICE_BATCH_SIZES``)."""
    return DEVICE_BATCH_SIZES.get(torch.device(device).type, 64)


PRECISIONS = ("full", "bf16", "int8")


def int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose Linear layers run int8 (dynamic quantisation: int8 weights,
    activations quantised per batch); CPU only, forward only (no gradients)."""
    with warnings.catch_warnings():  # torch marks the quantised tensor API deprecated (torchao replaces it)
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def progress(total: int, desc: str, trainer: pl.Trainer | None = None) -> LogProgress:
    """On rank 0: a progress bar in a terminal, log lines elsewhere."""
    return LogProgress(total, desc, enabled=trainer is None or trainer.is_global_zero)


class Defense(pl.Callback):
    """Base of the test-time defenses.

    During ``test`` (also the one after ``fit``): ``calibrate`` once on the clean held-out data
    (the data module's ``dev`` set) before the first batch, then ``defend`` every test batch
    (clean and poisoned samples, told apart by the batch's ``poisoned`` flag) next to the
    model's own undefended evaluation. Metrics go to the loggers and results.json as
    ``test/<name>/<metric>``, with ``wall_s`` (defending the test sets), ``calib_s`` and
    ``samples_per_s``; one CSV row per defended sample goes to
    ``<default_root_dir>/defense_<name>.csv``. Runs on the model's device, inside the trainer's
    precision context (``--trainer.precision bf16-mixed`` applies to defenses too).

    Args:
        name: metric prefix and CSV name.
        batch_size: samples per defense forward pass.
        max_samples: defend only a seeded random subset of this many samples of each test set
            (clean, poisoned); None: all.
        seed: seed of that subset and of any randomness of the defense.
        write_csv: write the per-sample CSV.
        calib_samples: calibrate on a seeded subset of this many clean dev samples (None: all).
        precision: inference precision of the defense's passes, opt-in: ``full`` (the model's
            own), ``bf16`` (autocast to bfloat16, CPU or GPU) or ``int8`` (a dynamically
            quantised copy of the classifier's Linear layers, CPU only; gradient steps, e.g.
            RAP's construction, still use the full model). How far detection moves is measured
            by scripts/bench_defenses.py.
    """

    #: (CSV column, axis label) of a detection score to plot with ``self.threshold``; None: no plot
    score_column: tuple[str, str] | None = None

    def __init__(self, name: str, batch_size: int | None = 64, max_samples: int | None = None, seed: int = 42, write_csv: bool = True,
                 precision: Literal["full", "bf16", "int8"] = "full", calib_samples: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"{name}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self._inference: torch.nn.Module | None = None
        self.name = name
        self.batch_size = batch_size
        self.max_samples = max_samples
        if calib_samples is not None and calib_samples < 1:
            raise ValueError(f"{name}: calib_samples must be >= 1 (or null: the whole dev set), got {calib_samples}")
        self.calib_samples = calib_samples
        self.seed = seed
        self.write_csv = write_csv
        self.rows: list[dict] = []
        self._subset: dict[bool, set[int]] | None = None

    # -- for subclasses ---------------------------------------------------------------------------
    def metrics(self, num_classes: int) -> torch.nn.Module:
        """torchmetrics to update in ``defend`` (synced across ranks); logged by their names."""
        raise NotImplementedError

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit thresholds (and anything else) on clean held-out data."""

    def defend(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, texts: list[str]) -> None:
        """Defend one batch: update ``self.metric`` and append CSV rows to ``self.rows``."""
        raise NotImplementedError

    def extra_results(self) -> dict[str, float]:
        """Values to log besides the metrics (already reduced across ranks)."""
        return {}

    # -- shared machinery -------------------------------------------------------------------------
    def model(self, pl_module: pl.LightningModule):
        """The classifier the defense's forward passes use (int8: the quantised copy)."""
        return self._inference if self._inference is not None else pl_module.model

    def passes(self, trainer: pl.Trainer, device) -> contextlib.ExitStack:
        """The context of the defense's passes: the trainer's precision, then ``precision``."""
        stack = contextlib.ExitStack()
        stack.enter_context(trainer.precision_plugin.forward_context())
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
        return stack

    @staticmethod
    def tokenizer(trainer: pl.Trainer):
        return trainer.datamodule.tokenizer

    @staticmethod
    def max_length(trainer: pl.Trainer) -> int:
        return trainer.datamodule.hparams.max_length

    def held_out_indices(self, trainer: pl.Trainer) -> list[int]:
        """Indices of the clean held-out (dev) examples calibration uses: all, or a seeded
        ``calib_samples`` of them; the same on every rank."""
        n = len(trainer.datamodule.examples("dev"))
        if self.calib_samples is None or self.calib_samples >= n:
            return list(range(n))
        return sorted(random.Random(f"{self.seed}-{self.name}-calibration").sample(range(n), self.calib_samples))

    def held_out(self, trainer: pl.Trainer) -> list[Example]:
        """The clean held-out (dev) examples calibration uses (``held_out_indices``)."""
        dev = trainer.datamodule.examples("dev")
        return [dev[i] for i in self.held_out_indices(trainer)]

    def _texts(self, trainer: pl.Trainer, batch: dict) -> list[str]:
        dm = trainer.datamodule
        sets = {False: dm.dataset("test").examples, True: dm.dataset("test_poisoned").examples}
        return [sets[bool(p)][int(i)].text for p, i in zip(batch["poisoned"], batch["index"])]

    def _pick(self, trainer: pl.Trainer, batch: dict) -> torch.Tensor:
        """Rows of the batch inside the ``max_samples`` subset."""
        if self.max_samples is None:
            return torch.ones(len(batch["index"]), dtype=torch.bool, device=batch["index"].device)
        if self._subset is None:
            dm = trainer.datamodule
            self._subset = {}
            for poisoned, name in ((False, "test"), (True, "test_poisoned")):
                n = len(dm.dataset(name))
                rng = random.Random(f"{self.seed}-{self.name}-{name}")
                self._subset[poisoned] = set(rng.sample(range(n), min(n, self.max_samples)))
        keep = [int(i) in self._subset[bool(p)] for p, i in zip(batch["poisoned"], batch["index"])]
        return torch.tensor(keep, dtype=torch.bool, device=batch["index"].device)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows, self._subset = [], None
        self.metric = self.metrics(pl_module.model.config.num_labels).to(pl_module.device)
        self.wall = self.samples = 0
        start = time.perf_counter()
        self._inference = None
        if self.precision == "int8":
            if pl_module.device.type != "cpu":
                raise ValueError(f"{self.name}: precision int8 (dynamic quantisation) runs on a CPU; on {pl_module.device.type} use bf16")
            self._inference = int8_dynamic(pl_module.model)
        with self.passes(trainer, pl_module.device):
            self.calibrate(trainer, pl_module)
        self.calib_s = time.perf_counter() - start
        log.info("%s: calibrated in %.1f s", self.name, self.calib_s)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        keep = self._pick(trainer, batch)
        if not keep.any():
            return
        if not keep.all():
            batch = {k: v[keep] for k, v in batch.items()}
        start = time.perf_counter()
        with self.passes(trainer, pl_module.device):
            self.defend(trainer, pl_module, batch, self._texts(trainer, batch))
        self.wall += time.perf_counter() - start
        self.samples += len(batch["index"])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = {k: float(v) for k, v in self.metric.compute().items()}  # synced across ranks
        wall = max(gather_objects(trainer, self.wall))  # ranks run in parallel
        samples = sum(gather_objects(trainer, self.samples))
        values.update(self.extra_results())
        values.update(wall_s=round(wall, 2), calib_s=round(self.calib_s, 2), samples=float(samples),
                      samples_per_s=samples / wall if wall > 0 else 0.0)
        for k, v in values.items():
            pl_module.log(f"test/{self.name}/{k}", v, sync_dist=False)
        rows = [r for part in gather_objects(trainer, self.rows) for r in part]
        if self.write_csv and trainer.is_global_zero and rows:
            out = Path(trainer.default_root_dir) / f"defense_{self.name}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            rows.sort(key=lambda r: (r["poisoned"], r["index"]))
            with out.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            log.info("%s: %d per-sample rows in %s", self.name, len(rows), out)
        if trainer.is_global_zero and rows and self.score_column is not None:
            scored = [r for r in rows if int(r.get("checked", 1))]
            column, label = self.score_column
            plots.score_histogram(
                [float(r[column]) for r in scored if not r["poisoned"]], [float(r[column]) for r in scored if r["poisoned"]],
                self.threshold, Path(trainer.default_root_dir) / f"defense_{self.name}.png",
                f"{self.name}: test samples, flagged below the threshold", label,
            )
        self.metric.reset()
