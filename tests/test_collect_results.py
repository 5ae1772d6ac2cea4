"""scripts/collect_results.py: one row per run, a column per defense metric any run carried."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rows_per_run_and_columns_per_defense_metric(tmp_path):
    a, b, missing = tmp_path / "v" / "other_classes", tmp_path / "v" / "any", tmp_path / "v" / "none"
    for d, auroc in ((a, 0.9075), (b, 0.848)):
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"test/cacc": 0.8671, "test/asr": 0.9989, "test/strip/frr": 0.02,
                                                    "test/strip/far": 0.89, "test/strip/auroc": auroc, "test/wall_s": 12.0}))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_results.py"), str(a), str(b), str(missing)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "| run | CACC | ASR | strip FRR | strip FAR | strip AUROC | test wall s |"
    assert out[2] == "| v/other_classes | 86.71 | 99.89 | 2.00 | 89.00 | 90.75 | 12.0 |"
    assert out[3].startswith("| v/any | 86.71 | 99.89 | 2.00 | 89.00 | 84.80 |")
    assert out[4].startswith("| v/none | (no results.json) |") and out[4].count("|") == out[0].count("|")
