"""The MBTSAD paper's Table II on this toolkit's victims, in one command: for each victim,
None, CFT, Reinit, Fine-pruning, TS-FT, MBTSAD, Fine-mixing, Fine-purifying (and STRIP and RAP
from the test-time defenses), each a `mitigate` run with the shipped recipe on the same 20%
clean data, then the table in the paper's layout (CACC / ASR, wall time per cell).

Resumable: a cell whose run folder holds results.json is not run again (CFT, TS-FT and MBTSAD
share their folders with scripts/reproduce_mbtsad.sh: runs/mbtsad/<victim>/<method>).

    python scripts/table2.py badnet_sst2 ep_sst2 [--methods reinit fine_mixing ...] [--print-only]

A victim is runs/<victim>/model with the overlay recipes/victims/<victim>.yaml (none for
badnet_sst2, the recipes' default). Extra `mitigate` flags: $MITIGATE_FLAGS.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

METHODS = {  # row -> recipe (None: the victim itself)
    "none": None, "cft": "cft_sst2", "reinit": "reinit_sst2", "fine_pruning": "fine_pruning_sst2",
    "tsft": "tsft_sst2", "mbtsad": "mbtsad_sst2", "fine_mixing": "fine_mixing_sst2",
    "fine_purifying": "fine_purifying_sst2", "epur": "epur_sst2",
}
LABELS = {"none": "None", "cft": "CFT", "reinit": "Reinit (last layer)", "fine_pruning": "Fine-pruning", "tsft": "TS-FT",
          "mbtsad": "MBTSAD", "fine_mixing": "Fine-mixing", "fine_purifying": "Fine-purifying", "epur": "E-PUR alone",
          "strip": "STRIP", "rap": "RAP"}
DEFAULT = ["none", "strip", "rap", "cft", "reinit", "fine_pruning", "tsft", "mbtsad", "fine_mixing", "fine_purifying"]


def load(path: Path) -> dict:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def overlay(victim: str) -> list[str]:
    return [] if victim == "badnet_sst2" else ["--config", f"recipes/victims/{victim}.yaml"]


def run(args: list[str], folder: Path) -> None:
    if (folder / "results.json").is_file():
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["mitigate", *args, "--trainer.default_root_dir", str(folder), *shlex.split(os.environ.get("MITIGATE_FLAGS", ""))]
    print("==", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(f"{folder}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"== {folder}: rc {rc}, {time.perf_counter() - start:.0f} s (log {folder}.log)", flush=True)


def cell(r: dict, prefix: str = "test/") -> str:
    if prefix + "cacc" not in r:
        return "-"
    return f"{100 * r[prefix + 'cacc']:.2f} / {100 * r[prefix + 'asr']:.2f}"


def detection(d: dict, name: str, victim: dict) -> str:
    """STRIP / RAP as the paper reports them: CACC / ASR once flagged inputs are rejected
    (a rejected clean input counts as wrong, a rejected poisoned one as not flipped)."""
    p = f"test/{name}/"
    if p + "frr" not in d or "test/cacc" not in victim:
        return "-"
    cacc = 100 * victim["test/cacc"] * (1 - d[p + "frr"])
    asr = 100 * victim["test/asr"] * d[p + "far"]
    return f"{cacc:.2f} / {asr:.2f} (FRR {100 * d[p + 'frr']:.1f}, FAR {100 * d[p + 'far']:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("victims", nargs="+")
    ap.add_argument("--methods", nargs="+", default=DEFAULT, choices=list(LABELS))
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--print-only", action="store_true", help="print the table from the runs there are")
    a = ap.parse_args()
    runs = Path(a.runs)
    for v in a.victims:
        if not (runs / v / "model").is_dir():
            sys.exit(f"{runs / v / 'model'}: no such victim (train it with its recipe first)")
        if a.print_only:
            continue
        for m in a.methods:
            if m in ("strip", "rap"):
                run(["test", "--config", "recipes/defend_quick_sst2.yaml", *overlay(v)], runs / "defend" / v)
            elif METHODS[m] is not None:
                run(["fit", "--config", f"recipes/{METHODS[m]}.yaml", *overlay(v)], runs / "mbtsad" / v / m)
    print("| defence | " + " | ".join(a.victims) + " |")
    print("| --- |" + " --- |" * len(a.victims))
    walls = {}
    for m in a.methods:
        row = []
        for v in a.victims:
            victim = load(runs / v)
            if m == "none":
                row.append(cell(victim))
            elif m in ("strip", "rap"):
                d = load(runs / "defend" / v)
                row.append(detection(d, m, victim))
                walls[(m, v)] = d.get(f"test/{m}/wall_s")
            else:
                r = load(runs / "mbtsad" / v / m)
                row.append(cell(r))
                walls[(m, v)] = r.get("report", {}).get("fit_wall_s")
        print(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    print("\nWall time per cell (s; fit for the mitigations, defending the test slice for STRIP / RAP):\n")
    print("| defence | " + " | ".join(a.victims) + " |")
    print("| --- |" + " --- |" * len(a.victims))
    for m in a.methods:
        if m != "none":
            print(f"| {LABELS[m]} | " + " | ".join(str(walls.get((m, v)) or "-") for v in a.victims) + " |")
    print("\nChoices made on clean dev data:\n")
    for v in a.victims:
        for m in ("fine_pruning", "fine_mixing", "fine_purifying", "mbtsad"):
            rep = load(runs / "mbtsad" / v / m).get("report", {})
            t = rep.get("transform", {})
            if m == "fine_pruning" and t:
                print(f"- {v}, Fine-pruning: rate {t.get('rate')} of the last layer's FFN units (dev CACC bound {t.get('min_dev_cacc')})")
            elif t:
                tried = ", ".join(f"{x['rho']}: {x['dev_cacc']}" for x in t.get("tried", []))
                print(f"- {v}, {LABELS[m]}: rho {t.get('rho')} (probe dev CACC per rho: {tried})")
            elif m == "mbtsad" and rep:
                print(f"- {v}, MBTSAD: TS-FT rate {rep.get('learning_rates', {}).get('tsft')}, suspects "
                      f"{', '.join(rep.get('trigger_scan', {}).get('suspects', [])) or 'none'}")


if __name__ == "__main__":
    main()
