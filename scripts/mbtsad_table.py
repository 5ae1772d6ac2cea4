"""The MBTSAD comparison table (CACC / ASR in %) from the runs of scripts/reproduce_mbtsad.sh:
per victim, the suspicious model, CFT, TS-FT (MBTSAD's teacher) and MBTSAD, all on the same
SST-2 test sets.

    python scripts/mbtsad_table.py badnet_sst2 insertsent_sst2 badnet_imbert_sst2 [--root runs/mbtsad]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def cell(r: dict, prefix: str) -> str:
    if f"{prefix}cacc" not in r:
        return "- / -"
    return f"{100 * r[prefix + 'cacc']:.2f} / {100 * r[prefix + 'asr']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("victims", nargs="+")
    ap.add_argument("--root", default="runs/mbtsad")
    args = ap.parse_args()
    print("| victim | suspicious | CFT | TS-FT | MBTSAD | MBTSAD CACC drop |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v in args.victims:
        cft, mb = load(Path(args.root) / v / "cft"), load(Path(args.root) / v / "mbtsad")
        drop = f"{100 * (mb['test/suspicious/cacc'] - mb['test/cacc']):.2f}" if mb else "-"
        print(f"| {v} | {cell(mb, 'test/suspicious/')} | {cell(cft, 'test/')} | "
              f"{cell(mb, 'test/teacher/')} | {cell(mb, 'test/')} | {drop} |")
    print("\nEach cell: CACC / ASR (%), SST-2 test set (1821 clean; poisoned: the non-target test samples).")


if __name__ == "__main__":
    main()
