"""One Markdown table of CACC / ASR from the results.json of several runs.

    python scripts/collect_results.py runs/clean_sst2 runs/badnet_sst2 runs/badnet_imbert_sst2 runs/insertsent_sst2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    print("| run | CACC | ASR | test wall s |\n| --- | --- | --- | --- |")
    for d in dirs:
        f = Path(d) / "results.json"
        if not f.is_file():
            print(f"| {Path(d).name} | (no results.json) | | |")
            continue
        r = json.loads(f.read_text())
        pct = lambda k: f"{100 * r[k]:.2f}" if k in r else "-"  # noqa: E731
        print(f"| {Path(d).name} | {pct('test/cacc')} | {pct('test/asr')} | {r.get('test/wall_s', '-')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
