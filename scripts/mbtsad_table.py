"""The MBTSAD comparison table (CACC / ASR in %) from the runs of scripts/reproduce_mbtsad.sh:
per victim, the ASR floor (the clean reference model on the same poisoned test set), the
suspicious model, CFT, TS-FT alone, MBTSAD's own teacher and MBTSAD, all on the same test sets;
then the spread over seeds where there are several MBTSAD runs.

    python scripts/mbtsad_table.py badnet_sst2 badnet_imbert_sst2 insertsent_sst2 badnet_olid [--root runs/mbtsad]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(path: Path) -> dict:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def cell(r: dict, prefix: str = "test/") -> str:
    if f"{prefix}cacc" not in r:
        return "-"
    return f"{100 * r[prefix + 'cacc']:.2f} / {100 * r[prefix + 'asr']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("victims", nargs="+")
    ap.add_argument("--root", default="runs/mbtsad")
    args = ap.parse_args()
    print("| victim | ASR floor | suspicious | CFT | TS-FT alone | MBTSAD's teacher | **MBTSAD** | CACC drop | TS-FT rate | suspects |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for v in args.victims:
        root = Path(args.root) / v
        floor, cft, tsft, mb = (load(root / m) for m in ("floor", "cft", "tsft", "mbtsad"))
        drop = f"{100 * (mb['test/suspicious/cacc'] - mb['test/cacc']):.2f}" if mb else "-"
        report = mb.get("report", {})
        rate = report.get("learning_rates", {}).get("tsft", "-")
        suspects = ", ".join(report.get("trigger_scan", {}).get("suspects", [])) or "none"
        print(f"| {v} | {100 * floor['test/asr']:.2f} | {cell(mb, 'test/suspicious/')} | {cell(cft)} | {cell(tsft)} | "
              f"{cell(mb, 'test/teacher/')} | **{cell(mb)}** | {drop} | {rate} | {suspects} |" if floor else
              f"| {v} | - | {cell(mb, 'test/suspicious/')} | {cell(cft)} | {cell(tsft)} | {cell(mb, 'test/teacher/')} | "
              f"**{cell(mb)}** | {drop} | {rate} | {suspects} |")
    print("\nEach cell: CACC / ASR (%) on the victim's test sets. ASR floor: the clean reference model's ASR on the "
          "same poisoned test set (a model that never saw the trigger also predicts some triggered inputs as the target).")
    for v in args.victims:
        root = Path(args.root) / v
        runs = [load(p) for p in [root / "mbtsad", *sorted(root.glob("mbtsad_seed*"))] if load(p)]
        if len(runs) > 1:
            cacc = [100 * r["test/cacc"] for r in runs]
            asr = [100 * r["test/asr"] for r in runs]
            print(f"\n{v}, {len(runs)} seeds: CACC {statistics.mean(cacc):.2f} ± {statistics.stdev(cacc):.2f}, "
                  f"ASR {statistics.mean(asr):.2f} ± {statistics.stdev(asr):.2f} (mean ± standard deviation; "
                  f"runs: {', '.join(f'{c:.2f}/{a:.2f}' for c, a in zip(cacc, asr))})")


if __name__ == "__main__":
    main()
