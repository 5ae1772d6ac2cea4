"""One Markdown table of CACC / ASR from the results.json of several runs, and of the
detection metrics (FRR / FAR / AUROC) of every test-time defense the runs carried.

    python scripts/collect_results.py runs/clean_sst2 runs/badnet_sst2 runs/badnet_imbert_sst2 runs/insertsent_sst2
    python scripts/collect_results.py runs/strip_pool/*/*      # a defense's options side by side
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DETECTION = ("frr", "far", "auroc")


def name(d: Path) -> str:
    """The run folder, with its parent when several runs share a name (runs/strip_pool/<victim>/<pool>)."""
    return f"{d.parent.name}/{d.name}" if d.parent.name not in ("runs", "") else d.name


def main(dirs: list[str]) -> None:
    results = {}
    for d in map(Path, dirs):
        f = d / "results.json"
        results[d] = json.loads(f.read_text()) if f.is_file() else None
    defenses = sorted({m.group(1) for r in results.values() if r for k in r
                       if (m := re.fullmatch(r"test/([^/]+)/(frr|far|auroc)", k))})
    extra = [(dfn, m) for dfn in defenses for m in DETECTION]
    print("| run | CACC | ASR | " + "".join(f"{dfn} {m.upper()} | " for dfn, m in extra) + "test wall s |")
    print("| --- " * (4 + len(extra)) + "|")
    for d, r in results.items():
        if r is None:
            print(f"| {name(d)} | (no results.json) |" + " |" * (2 + len(extra)))
            continue
        pct = lambda k: f"{100 * r[k]:.2f}" if k in r else "-"  # noqa: E731
        cells = "".join(f"{pct(f'test/{dfn}/{m}')} | " for dfn, m in extra)
        print(f"| {name(d)} | {pct('test/cacc')} | {pct('test/asr')} | {cells}{r.get('test/wall_s', '-')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
