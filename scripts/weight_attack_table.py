"""The tables of docs/weight_attacks.md from the runs of scripts/reproduce_weight_attacks.sh:
the victims (CACC / ASR, the clean model's ASR floor, LWP's false-trigger rate, fit time), then,
per victim, every shipped mitigation and test-time defense on it.

    python scripts/weight_attack_table.py [ep_sst2 lwp_sst2 ripples_victim_sst2] [--runs runs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFENSES = {"imbert_g": "IMBERT-G", "rap": "RAP", "strip": "STRIP", "onion": "ONION"}


def load(path: Path) -> dict:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def pct(r: dict, key: str) -> str:
    return f"{100 * r[key]:.2f}" if key in r else "-"


def pair(r: dict, prefix: str = "test/") -> str:
    return f"{pct(r, prefix + 'cacc')} / {pct(r, prefix + 'asr')}" if prefix + "cacc" in r else "-"


def secs(v) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("victims", nargs="*", default=["ep_sst2", "lwp_sst2", "ripples_victim_sst2"])
    ap.add_argument("--runs", default="runs")
    args = ap.parse_args()
    runs = Path(args.runs)
    print("| victim | CACC / ASR | clean model CACC / ASR floor | false-trigger rate (clean model) | fit wall s |")
    print("| --- | --- | --- | --- | --- |")
    for v in args.victims:
        r, floor = load(runs / v), load(runs / "mbtsad" / v / "floor")
        single = load(runs / "mbtsad" / v / "floor_single_piece")
        ftr = f"{pct(r, 'test/false_trigger_rate')} ({pct(single, 'test/false_trigger_rate')})" if "test/false_trigger_rate" in r else "-"
        print(f"| {v} | {pair(r)} | {pair(floor)} | {ftr} | {secs(r.get('report', {}).get('fit_wall_s'))} |")
    for v in args.victims:
        root = runs / "mbtsad" / v
        mb, defend = load(root / "mbtsad"), load(runs / "defend" / v)
        print(f"\n{v}:\n")
        print("| method | CACC / ASR (%) | FRR / FAR / AUROC (%) | chosen on clean dev | wall s |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| none | {pair(load(runs / v))} | | | |")
        for name, label in (("cft", "CFT"), ("tsft", "TS-FT alone"), ("mbtsad", "MBTSAD")):
            r = load(root / name)
            rep = r.get("report", {})
            chosen = []
            if name == "mbtsad" and rep:
                chosen.append(f"TS-FT rate {rep.get('learning_rates', {}).get('tsft', '-')}")
                chosen.append("suspects: " + (", ".join(rep.get("trigger_scan", {}).get("suspects", [])) or "none"))
            print(f"| {label} | {pair(r)} | | {'; '.join(chosen)} | {secs(rep.get('fit_wall_s'))} |")
        for key, label in DEFENSES.items():
            p = f"test/{key}/"
            if p + "cacc" in defend:
                print(f"| {label} (corrected, on the slice) | {pair(defend, p)} | | | {secs(defend.get(p + 'wall_s'))} |")
            elif p + "frr" in defend:
                det = f"{pct(defend, p + 'frr')} / {pct(defend, p + 'far')} / {pct(defend, p + 'auroc')}"
                print(f"| {label} (on the slice) | | {det} | | {secs(defend.get(p + 'wall_s'))} |")
        if mb:
            print(f"\nMBTSAD's own ASR floor reading: clean model on the same poisoned test set {pct(load(root / 'floor'), 'test/asr')}%.")


if __name__ == "__main__":
    main()
