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
    preferred = ["cacc", "macro_f1", "asr", "floor", "frr", "far", "auroc", "precision", "wall_s", "samples_per_s"]
    metrics = [m for m in preferred if any(m in r for r in rows.values())]
    metrics += sorted({m for r in rows.values() for m in r} - set(metrics))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for n in rows:
        cells = [_show(m, rows[n][m]) if m in rows[n] else "" for m in metrics]
        lines.append(f"| {names.get(n, n or 'model')} | " + " | ".join(cells) + " |")
    return lines


def verdict(results: dict[str, float]) -> str | None:
    """What the numbers say, in one sentence (None without an ASR). A cleaning (the suspicious
    model measured beside it) is judged by its ASR against its own floor (``floor``) and its CACC
    against the suspicious model's: cleaned when ASR ends within 5 points of the floor at a
    CACC drop of at most 2 points."""
    asr, floor, cacc = results.get("test/asr"), results.get("test/floor"), results.get("test/cacc")
    if asr is None:
        return None
    pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
    floor_s = f" (its own floor: {pct(floor)})" if floor is not None and floor == floor else ""
    before = results.get("test/suspicious/asr")
    if before is None:
        if floor is not None and floor == floor and asr >= floor + 0.2:
            return f"Backdoored for this attack: ASR {pct(asr)}{floor_s}."
        return f"No backdoor seen for this attack: ASR {pct(asr)}{floor_s}."
    cacc_before = results.get("test/suspicious/cacc", cacc)
    drop = 100 * (cacc_before - cacc) if cacc is not None and cacc_before is not None else 0.0
    change = f"ASR {pct(before)} -> {pct(asr)}{floor_s}, CACC {pct(cacc_before)} -> {pct(cacc)}"
    if asr > before + 0.01:
        return f"ASR went up: not cleaned ({change})."
    if floor is not None and floor == floor and asr <= floor + 0.05 and drop <= 2.0:
        return f"Cleaned for this attack ({change})."
    if asr < before - 0.05:
        return f"Partly cleaned ({change}); " + ("ASR stays above its floor." if drop <= 2.0 else "CACC fell more than 2 points.")
    return f"Not cleaned ({change})."


def test_coverage(trainer: pl.Trainer) -> dict:
    """How much of the test sets the test saw (``batches`` of ``of_batches`` on each of
    ``processes``), and where the data come from."""
    dm = trainer.datamodule
    used = int(sum(trainer.num_test_batches)) if trainer.num_test_batches else 0
    total = len(dm.test_dataloader())
    return {"source": getattr(dm, "source", str(dm.hparams.get("path"))), "clean": len(dm.dataset("test")),
            "poisoned": len(dm.dataset("test_poisoned")), "batches": used, "of_batches": total,
            "processes": trainer.world_size, "partial": used < total}


def coverage_line(cover: dict, source: str) -> str:
    """One sentence on how much was tested (``test_coverage``'s record), partial runs in bold."""
    each = " on each of {} processes".format(cover["processes"]) if cover.get("processes", 1) > 1 else ""
    part = f"**partial test**: {cover['batches']} of {cover['of_batches']} batches{each} of " if cover["partial"] else ""
    return f"Tested on {part}{cover['clean']} clean + {cover['poisoned']} poisoned samples of {source}."


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
    said = verdict(results)
    if said:
        lines += [f"**{said}**", ""]
    cover = (report or {}).get("test_data")
    if cover:
        lines += [coverage_line(cover, cover["source"]), ""]
    refused = (report or {}).get("export")
    if refused and not refused.get("exported", True):
        lines += [f"**Not exported**: {refused['reason']}. The numbers below are those of the model as trained.", ""]
    lines += [*results_table(results, row_names), "",
              "Rates in %. ASR: poisoned test samples classified as the attacker's target (lower is better); floor: "
              "the same model's share of their clean versions already classified as the target (an ASR near it "
              "means the trigger does nothing)."]
    if figures:
        lines += ["", "## Figures", "", *[f"![{Path(f).stem}]({f})" for f in figures]]
    if report:
        lines += ["", *report_sections(report)]
    (d / "results.md").write_text("\n".join(lines) + "\n")


def report_sections(report: dict) -> list[str]:
    """Markdown for the choices a run made on clean data (see MBTSAD.report)."""
    lines: list[str] = []
    if report.get("plan"):
        lines += ["## Plan (chosen on clean data)", ""]
        lines += [f"{i}. {'' if step['taken'] else '(skipped) '}{step['step']}: {step['why']}" for i, step in enumerate(report["plan"], 1)]
        lines.append("")
    scan = report.get("trigger_scan")
    if scan:
        lines += ["## Trigger scan (clean dev data only)", "",
                  f"Suspect tokens: {', '.join(scan['suspects']) or 'none'} ({scan['seconds']} s). "
                  f"Settings: {scan['settings']}.", "",
                  "| token or phrase | flips to | flip rate | carrier p | clean texts with it | smoothed share with that label | lift over the label's prior | suspect |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(scan["verified"], key=lambda r: -r["flip_rate"]):
            lift = f"{r['clean_lift']:.2f}" if "clean_lift" in r else ""
            lines.append(f"| {r['text']} | {r['label']} | {100 * r['flip_rate']:.1f} | {r['carrier_score']:.3f} | "
                         f"{r['clean_count']} | {100 * r['clean_share']:.0f} | {lift} | {'yes' if r['suspect'] else ''} |")
        lines.append("")
        if any(r.get("found_by") == "inversion" for r in scan["verified"]):
            lines += ["Rows found by the trigger inversion give its final loss as the carrier p.", ""]
        if scan.get("control") is not None:
            lines += ["Clean control (the reference fine-tuned on the clean data alone): a suspect that flips it too is a "
                      "natural feature of the task, reported and not unlearned.", "",
                      "| token or phrase | flips to | suspicious model | clean control | verdict |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {r['text']} | {r['label']} | {100 * r['flip_rate']:.1f} | {100 * r['control_flip_rate']:.1f} | "
                      f"{'natural' if r['natural'] else 'trigger'} |" for r in scan["control"]]
            lines.append("")
    rescan = report.get("rescan")
    if rescan:
        lines += ["## Re-scan after cleaning (clean dev data only)", "",
                  "| found trigger | flips to | flip rate, suspicious | flip rate, cleaned |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['text']} | {r['label']} | {100 * r['suspicious']:.1f} | {100 * r['cleaned']:.1f} |" for r in rescan["found"]]
        if "inversion_after" in rescan:
            again = "; ".join(f"label {r['label']}: `{r['text']}` {100 * r['flip_rate']:.0f}%" for r in rescan["inversion_after"])
            lines += ["", f"Trigger inversion of the cleaned model: {'backdoor still suspected' if rescan['suspected_after'] else 'nothing flips'} ({again})."]
        lines.append("")
    choice = report.get("export_choice")
    if choice:
        lines += ["## Export choice (clean dev data only)", "",
                  f"Exported: **{'the TS-FT teacher' if choice['exported'] == 'teacher' else 'the MBTSAD student'}**: {choice['why']}. "
                  f"A found trigger is live on a model when it flips >= {100 * choice['live_flip']:.0f}% of the clean dev samples "
                  "it is inserted into.", ""]
        if "teacher" in choice and choice["suspects"]:
            lines += ["| found trigger | flip rate, student | flip rate, teacher |", "| --- | --- | --- |"]
            lines += [f"| {t} | {100 * a:.1f} | {100 * b:.1f} |" for t, a, b in
                      zip(choice["suspects"], choice["student"]["flips"], choice["teacher"]["flips"])]
            lines.append("")
    if "fit_wall_s" in report:
        lines += [f"Training wall time (`fit`, this process): {report['fit_wall_s']} s.", ""]
    for key, value in report.items():
        if key not in ("trigger_scan", "fit_wall_s", "test_data", "export", "plan", "rescan", "export_choice"):
            lines += [f"## {key}", "", "```", json.dumps(value, indent=2), "```", ""]
    return lines


def _is_rate(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in {"cacc", "macro_f1", "asr", "floor", "frr", "far", "acc", "auroc", "precision", "false_trigger_rate", "asr@1", "asr@3", "asr@5", "never_flipped"}


def figures(results: dict[str, float], dirpath: Path, trainer: pl.Trainer | None, row_names: dict[str, str] | None) -> list[Path]:
    """The run's figures: CACC / ASR per model or correction defense (before / after), validation
    curves of a fit, and the detection defenses' histograms (written by the defenses)."""
    out = []
    names = dict(row_names or {})
    rows = metrics_by_model(results, row_names, ("cacc", "asr", "floor"))
    pct = lambda r, m: 100 * r[m] if m in r and r[m] == r[m] else None  # noqa: E731
    bars = {names.get(n, n or "model"): (pct(r, "cacc"), pct(r, "asr"), pct(r, "floor")) for n, r in rows.items()
            if "cacc" in r or "asr" in r}
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


#: the row label of a fit's model by what it trained on
ROLES = {"poisoned": "victim", "poisoned_only": "victim", "corpus": "victim", "clean": "clean fine-tune", "clean_subset": "CFT"}


def row_label(trainer: pl.Trainer, fitted: bool) -> str:
    """results.md's label for the run's own model when the module names none: what it is."""
    if any("Defense" in {c.__name__ for c in type(cb).__mro__} for cb in trainer.callbacks):
        return "no defense"
    if not fitted:
        return "the model"
    dm = trainer.datamodule
    role = ROLES.get(dm.hparams.get("train_set"), "the model")
    return "TS-FT" if role == "CFT" and getattr(dm, "token_split", None) is not None else role


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
        row_names = getattr(pl_module, "report_rows", None) or {"": row_label(trainer, getattr(self, "_fit_s", None) is not None)}
        pngs = figures(results, dirpath, trainer, row_names)
        report = dict(getattr(pl_module, "report", None) or {})
        report["test_data"] = test_coverage(trainer)
        if getattr(self, "_fit_s", None) is not None:  # the fit of this process (resumed: since the resume)
            report["fit_wall_s"] = self._fit_s
        write_results(
            {**results, "test/wall_s": wall}, dirpath, title=type(pl_module).__name__,
            row_names=row_names, report=report or None, figures=[p.name for p in pngs],
        )
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger" and pngs:
                lg.log_image(key="figures", images=[str(p) for p in pngs], caption=[p.stem for p in pngs])
