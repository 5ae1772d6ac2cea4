"""The tables of docs/clean.md from the run folders of scripts/evaluate_clean.sh: the scan's
verdict on every model (``*/scan/scan.json``) and each ``mitigate clean`` run against its
victim and floor (``clean_*/results.json``; ``clean3_*``: the runs with the inversion's rounds and the
embedding neighbours; ``cleanref_*``: the same with the clean pre-trained weights as
reference, ``cleanref0_*`` before the rate probes started from the Fine-mixed weights,
``cleanref1_*`` before a teacher that fails the collapse guard was trained again at a lower rate;
docs/clean.md), and the clean fine-tuning baseline (``cft_*/results.json``) for the cost ratio; the scans with a clean control
(``*/scan_control/scan.json``) in a table of their own. Analysis only: it reads the attacks' targets from
the victims' folder names, which no method sees.

    python scripts/clean_table.py runs/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def scan_rows(root: Path, folder: str = "scan") -> list[str]:
    """One row per ``*/{folder}/scan.json`` (``scan_control``: the scans with a clean control,
    whose natural features are listed per label)."""
    rows = ["| model | verdict | label 0 | label 1 | class prior removed | scan time (s) |", "| --- | --- | --- | --- | --- | --- |"]
    for path in sorted(root.glob(f"*/{folder}/scan.json")):
        r = json.loads(path.read_text())
        cells = []
        for row in r["labels"]:
            found = ", ".join(f"`{t['text']}` {100 * t['flip_rate']:.0f}%" for t in row["triggers"][:4])
            more = f" (+{len(row['triggers']) - 4})" if len(row["triggers"]) > 4 else ""
            natural = [n for n in r.get("natural", []) if n["label"] == row["label"]]
            nat = ("; natural (clean control): " + ", ".join(f"`{n['text']}` {100 * n['control_flip_rate']:.0f}%" for n in natural[:4])
                   + (f" (+{len(natural) - 4})" if len(natural) > 4 else "")) if natural else ""
            cells.append((f"suspected: {found}{more}" if row["suspected"] else "-") + nat)
        verdict = "**backdoor suspected**" if r["suspected"] else "no backdoor found"
        prior = " / ".join(f"{p:.2f}" for p in r.get("prior", [])) or "no"
        rows.append(f"| {path.parent.parent.name} | {verdict} | {' | '.join(cells)} | {prior} | {r['total_seconds']:.0f} |")
    return rows


def clean_rows(root: Path) -> list[str]:
    rows = ["| victim | suspicious CACC / macro-F1 / ASR | cleaned CACC / macro-F1 / ASR | plan | found triggers' flip rate (suspicious -> cleaned) | wall time (s) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for path in sorted(root.glob("clean*_*/results.json")):
        r = json.loads(path.read_text())
        if "test/suspicious/asr" not in r:  # a clean model's own run, not a cleaning
            continue
        rep = r.get("report", {})
        plan = "; ".join(s["step"] for s in rep.get("plan", []) if s["taken"])
        found = ", ".join(f"`{f['text']}` {100 * f['suspicious']:.0f}->{100 * f['cleaned']:.0f}" for f in rep.get("rescan", {}).get("found", [])[:5])
        sus = f"{pct(r.get('test/suspicious/cacc'))} / {pct(r.get('test/suspicious/macro_f1'))} / {pct(r.get('test/suspicious/asr'))}"
        out = f"{pct(r.get('test/cacc'))} / {pct(r.get('test/macro_f1'))} / {pct(r.get('test/asr'))}"
        run, _, victim = path.parent.name.partition("_")
        name = victim if run == "clean" else f"{victim} ({run})"
        rows.append(f"| {name} | {sus} | {out} | {plan} | {found or '-'} | {rep.get('fit_wall_s', '-')} |")
    return rows


def cft_rows(root: Path) -> list[str]:
    rows = ["| victim | CFT CACC / macro-F1 / ASR | wall time (s) |", "| --- | --- | --- |"]
    for path in sorted(root.glob("cft_*/results.json")):
        r = json.loads(path.read_text())
        rows.append(f"| {path.parent.name[len('cft_'):]} | {pct(r.get('test/cacc'))} / {pct(r.get('test/macro_f1'))} / "
                    f"{pct(r.get('test/asr'))} | {r.get('report', {}).get('fit_wall_s', '-')} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("runs/eval"))
    args = parser.parse_args()
    print("\n".join(["## mitigate scan", "", *scan_rows(args.root), "", "## mitigate scan --reference (clean control)", "",
                     *scan_rows(args.root, "scan_control"), "", "## mitigate clean", "", *clean_rows(args.root),
                     "", "## CFT", "", *cft_rows(args.root)]))


if __name__ == "__main__":
    main()
