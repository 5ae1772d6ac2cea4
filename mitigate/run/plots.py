"""The figures a run writes next to results.md: CACC / ASR before and after (mitigations and
correction defenses), score histograms with the threshold (detection defenses), and
validation CACC / ASR through training. Plain functions: data in, PNG out."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cacc_asr_bars(rows: dict[str, tuple], path: Path, title: str) -> Path:
    """Grouped bars of CACC and ASR (in %) per model or defense, in the order given; a third
    value per row, when given, is the model's own ASR floor, drawn as a dash over its ASR bar.
    The legend sits above the axes, clear of the values."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(4.8, 1.4 * len(names) + 1.8), 3.9))
    width = 0.38
    for k, (metric, color) in enumerate((("CACC (higher is better)", "#3b7dd8"), ("ASR (lower is better)", "#d8543b"))):
        values = [rows[n][k] for n in names]
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        bars = ax.bar(xs, [v if v is not None else 0 for v in values], width, label=metric, color=color)
        for b, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    floors = [(i + 0.5 * width, r[2]) for i, r in enumerate(rows[n] for n in names) if len(r) > 2 and r[2] is not None]
    if floors:
        ax.hlines([f for _, f in floors], [x - width / 2 for x, _ in floors], [x + width / 2 for x, _ in floors],
                  colors="black", linestyles="--", linewidth=1.2, label="ASR floor (the model without the trigger)")
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10, pad=28)
    ax.legend(fontsize=7.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    return _save(fig, path)


def score_histogram(clean: Sequence[float], poisoned: Sequence[float], threshold: float, path: Path, title: str, xlabel: str) -> Path:
    """Histograms of a detection score for clean and poisoned test samples, with the threshold."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    values = list(clean) + list(poisoned)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
    ax.hist(clean, bins=bins, alpha=0.6, label=f"clean ({len(clean)})", color="#3b7dd8")
    ax.hist(poisoned, bins=bins, alpha=0.6, label=f"poisoned ({len(poisoned)})", color="#d8543b")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def validation_curves(metrics_csv: Path, path: Path, title: str) -> Path | None:
    """Validation CACC and ASR (in %) against the training step, from a CSVLogger metrics.csv;
    None when it holds no validation."""
    steps, cacc, asr = [], [], []
    with Path(metrics_csv).open() as f:
        for row in csv.DictReader(f):
            if row.get("val/cacc"):
                steps.append(int(row["step"]))
                cacc.append(100 * float(row["val/cacc"]))
                asr.append(100 * float(row["val/asr"]) if row.get("val/asr") else float("nan"))
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(steps, cacc, "o-", label="dev CACC", color="#3b7dd8")
    if any(a == a for a in asr):
        ax.plot(steps, asr, "s-", label="dev ASR", color="#d8543b")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)
