"""The POR / NeuBA tables of docs/task_agnostic.md from finished runs.

For each downstream run (a `TriggerEffectiveness` test: trigger_effectiveness.json and
results.json in its folder): CACC, then per trigger the label it induces, ASR@1/3/5, the share
never flipped, E, S, C, beside the same metrics on the clean model (the floor run), and the
best trigger per label. ``--cleaned`` adds ASR@1 per trigger for cleaned models of one victim.

    python scripts/task_agnostic_table.py runs/por_sst2 --floor runs/floor_por_sst2
    python scripts/task_agnostic_table.py runs/por_sst2 --cleaned runs/mbtsad/por_sst2/{cft,mbtsad,fine_mixing}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: str) -> tuple[float, dict, dict]:
    folder = Path(run)
    te = folder / "trigger_effectiveness.json"
    if not te.is_file():
        raise SystemExit(f"{te}: not found (run the test with the TriggerEffectiveness callback first)")
    data = json.loads(te.read_text())
    cacc = json.loads((folder / "results.json").read_text()).get("test/cacc")
    return cacc, data["per_trigger"], data["summary"]


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def trigger_table(run: str, floor: str | None) -> str:
    cacc, per, summary = load(run)
    fcacc, fper, _ = load(floor) if floor else (None, {}, None)
    out = [f"**{run}**: CACC {100 * cacc:.2f}" + (f"; floor {floor}: CACC {100 * fcacc:.2f}" if floor else ""), ""]
    out.append("| trigger | label | ASR@1 / @3 / @5 | never flipped | E | S | C | floor: label, ASR@1, never flipped |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t, r in per.items():
        f = fper.get(t)
        fl = f"{f['label']}, {pct(f['asr@1'])}, {pct(f['never_flipped'])}" if f else ""
        out.append(f"| {t} | {r['label']} | {pct(r['asr@1'])} / {pct(r['asr@3'])} / {pct(r['asr@5'])} | "
                   f"{pct(r['never_flipped'])} | {r['E']:.2f} | {r['S']:.3f} | {r['C']:.2f} | {fl} |")
    out.append(f"| average | | | {pct(summary['never_flipped'])} | {summary['E']:.2f} | {summary['S']:.3f} | {summary['C']:.2f} | |")
    best = {lab: max(((t, r) for t, r in per.items() if r["label"] == int(lab)), key=lambda tr: tr[1]["asr@1"], default=None)
            for lab in ("0", "1")}
    out.append("")
    out.append("Best trigger per label (ASR@1): " + "; ".join(
        f"label {lab}: " + (f"{b[0]} {pct(b[1]['asr@1'])}" if b else "none") for lab, b in best.items()))
    return "\n".join(out)


def cleaned_table(victim: str, cleaned: list[str], floor: str | None) -> str:
    runs = [("victim", victim)] + [(Path(c).name, c) for c in cleaned] + ([("floor (clean model)", floor)] if floor else [])
    loaded = [(name, *load(path)) for name, path in runs]
    triggers = list(loaded[0][2])
    vlabel = {t: loaded[0][2][t]["label"] for t in triggers}
    out = ["| | " + " | ".join(triggers) + " | CACC |", "| --- |" + " --- |" * (len(triggers) + 1)]
    for name, cacc, per, _ in loaded:
        cells = [pct(per[t]["asr@1"]) + ("" if per[t]["label"] == vlabel[t] else f" (-> {per[t]['label']})") for t in triggers]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {100 * cacc:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="downstream run folders")
    ap.add_argument("--floor", nargs="*", default=None, help="the clean model's run per downstream run (same order)")
    ap.add_argument("--cleaned", nargs="*", default=None, help="cleaned models of the first run")
    args = ap.parse_args()
    floors = args.floor or []
    if floors and len(floors) not in (1, len(args.runs)):
        ap.error("--floor: one floor run, or one per downstream run")
    for i, run in enumerate(args.runs):
        floor = floors[i] if len(floors) == len(args.runs) else (floors[0] if floors else None)
        if args.cleaned:
            print(cleaned_table(run, args.cleaned, floor))
        else:
            print(trigger_table(run, floor))
        print()


if __name__ == "__main__":
    main()
