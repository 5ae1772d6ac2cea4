"""Final metrics of a run as results.json (a flat dict) and results.md (a table)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


def write_results(results: dict[str, float], dirpath: str | Path, title: str = "Results") -> None:
    """Write ``results.json`` and a Markdown table ``results.md`` into ``dirpath``."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    rows = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    for k in sorted(results):
        v = results[k]
        shown = f"{100 * v:.2f}%" if _is_rate(k) else (f"{v:.4g}" if isinstance(v, float) else str(v))
        rows.append(f"| {k} | {shown} |")
    (d / "results.md").write_text("\n".join(rows) + "\n")


def _is_rate(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in {"cacc", "asr", "frr", "far", "acc"}


class ResultsWriter(pl.Callback):
    """After ``test``, writes every ``test/*`` metric to ``dirpath/results.json`` and ``results.md``."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._start = 0.0

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        results["test/wall_s"] = round(time.perf_counter() - self._start, 2)
        write_results(results, self.dirpath or trainer.default_root_dir, title=type(pl_module).__name__)
