"""Final metrics of a run as results.json (a flat dict) and results.md (a table)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from mitigate.run import plots


def split_metric_key(key: str) -> tuple[str, str]:
    """``test/<metric>`` -> ("", metric) (the run's model); ``test/<name>/<metric>`` -> (name, metric)."""
    parts = key.split("/")
    return ("/".join(parts[1:-1]), parts[-1]) if len(parts) > 2 else ("", parts[-1])


def metrics_by_model(results: dict[str, float], row_names: dict[str, str] | None = None,
                     metrics: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """The results grouped per evaluated model: name -> {metric: value}, ordered as
    ``row_names`` lists them, the rest sorted; ``metrics`` keeps only those metrics."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        name, metric = split_metric_key(key)
        if metrics is None or metric in metrics:
            rows.setdefault(name, {})[metric] = value
    names = dict(row_names or {})
    order = [n for n in names if n in rows] + sorted(n for n in rows if n not in names)
    return {n: rows[n] for n in order}


def results_table(results: dict[str, float], row_names: dict[str, str] | None = None) -> list[str]:
    """A Markdown table with one row per evaluated model and one column per metric.

    ``test/<metric>`` belongs to the run's model, ``test/<name>/<metric>`` to model ``name``
    (MBTSAD: ``suspicious``, ``teacher``). ``row_names`` maps names ("" for the run's model)
    to the labels shown, and orders the rows."""
    rows = metrics_by_model(results, row_names)
    names = dict(row_names or {})
    preferred = ["cacc", "asr", "frr", "far", "auroc", "precision", "wall_s", "samples_per_s"]
    metrics = [m for m in preferred if any(m in r for r in rows.values())]
    metrics += sorted({m for r in rows.values() for m in r} - set(metrics))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for n in rows:
        cells = [_show(m, rows[n][m]) if m in rows[n] else "" for m in metrics]
        lines.append(f"| {names.get(n, n or 'model')} | " + " | ".join(cells) + " |")
    return lines


def _show(metric: str, v: float) -> str:
    return f"{100 * v:.2f}" if _is_rate(metric) else (f"{v:.4g}" if isinstance(v, float) else str(v))


def write_results(
    results: dict[str, float], dirpath: str | Path, title: str = "Results", row_names: dict[str, str] | None = None,
    report: dict | None = None,
    figures: Sequence[str] = (),
) -> None:
    """Write ``results.json`` (the metrics, flat; the run's choices under ``report``) and
    ``results.md`` (a model x metric table, rates in %, then the choices)."""
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    payload = {**results, "report": report} if report else results
    (d / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    lines = [f"# {title}", ""]
    refused = (report or {}).get("export")
    if refused and not refused.get("exported", True):
        lines += [f"**Not exported**: {refused['reason']}. The numbers below are those of the model as trained.", ""]
    lines += [*results_table(results, row_names), "", "Rates (CACC, ASR, ...) in %."]
    if figures:
        lines += ["", "## Figures", "", *[f"![{Path(f).stem}]({f})" for f in figures]]
    if report:
        lines += ["", *report_sections(report)]
    (d / "results.md").write_text("\n".join(lines) + "\n")


def report_sections(report: dict) -> list[str]:
    """Markdown for the choices a run made on clean data (see MBTSAD.report)."""
    lines: list[str] = []
    scan = report.get("trigger_scan")
    if scan:
        lines += ["## Trigger scan (clean dev data only)", "",
                  f"Suspect tokens: {', '.join(scan['suspects']) or 'none'} ({scan['seconds']} s). "
                  f"Settings: {scan['settings']}.", "",
                  "| token or phrase | flips to | flip rate | carrier p | clean texts with it | smoothed share with that label | suspect |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(scan["verified"], key=lambda r: -r["flip_rate"]):
            lines.append(f"| {r['text']} | {r['label']} | {100 * r['flip_rate']:.1f} | {r['carrier_score']:.3f} | "
                         f"{r['clean_count']} | {100 * r['clean_share']:.0f} | {'yes' if r['suspect'] else ''} |")
        lines.append("")
    if "fit_wall_s" in report:
        lines += [f"Training wall time (`fit`, this process): {report['fit_wall_s']} s.", ""]
    for key, value in report.items():
        if key not in ("trigger_scan", "fit_wall_s"):
            lines += [f"## {key}", "", "```", json.dumps(value, indent=2), "```", ""]
    return lines


def _is_rate(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in {"cacc", "asr", "frr", "far", "acc", "auroc", "precision", "false_trigger_rate", "asr@1", "asr@3", "asr@5", "never_flipped"}


def figures(results: dict[str, float], dirpath: Path, trainer: pl.Trainer | None, row_names: dict[str, str] | None) -> list[Path]:
    """The run's figures: CACC / ASR per model or correction defense (before / after), validation
    curves of a fit, and the detection defenses' histograms (written by the defenses)."""
    out = []
    names = dict(row_names or {})
    rows = metrics_by_model(results, row_names, ("cacc", "asr"))
    bars = {names.get(n, n or "model"): (100 * r["cacc"] if "cacc" in r else None, 100 * r["asr"] if "asr" in r else None)
            for n, r in rows.items()}
    if bars:
        out.append(plots.cacc_asr_bars(bars, dirpath / "cacc_asr.png", "CACC and ASR on the test sets"))
    logger = getattr(trainer, "logger", None) if trainer is not None else None
    log_dir = getattr(logger, "log_dir", None)
    if log_dir and (Path(log_dir) / "metrics.csv").is_file():
        curve = plots.validation_curves(Path(log_dir) / "metrics.csv", dirpath / "validation.png", "Validation during training")
        if curve:
            out.append(curve)
    out += sorted(dirpath.glob("defense_*.png"))
    return out


class ResultsWriter(pl.Callback):
    """After ``test``, writes every ``test/*`` metric to ``dirpath/results.json`` and ``results.md``,
    with the run's figures (PNG, linked from results.md; logged to W&B as images when W&B is on)."""

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_s = round(time.perf_counter() - self._fit_start, 1)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        wall = round(time.perf_counter() - self._start, 2)
        dirpath = Path(self.dirpath or trainer.default_root_dir)
        dirpath.mkdir(parents=True, exist_ok=True)
        row_names = getattr(pl_module, "report_rows", None)
        pngs = figures(results, dirpath, trainer, row_names)
        report = dict(getattr(pl_module, "report", None) or {})
        if getattr(self, "_fit_s", None) is not None:  # the fit of this process (resumed: since the resume)
            report["fit_wall_s"] = self._fit_s
        write_results(
            {**results, "test/wall_s": wall}, dirpath, title=type(pl_module).__name__,
            row_names=row_names, report=report or None, figures=[p.name for p in pngs],
        )
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger" and pngs:
                lg.log_image(key="figures", images=[str(p) for p in pngs], caption=[p.stem for p in pngs])
