"""Analysis: what the export choice (``model.live_flip``, docs/clean.md) reads, measured again on
a finished `mitigate clean` run's exported folders, ``model/`` (the student, when the run had no
export choice) and ``teacher/``: each found trigger's flip rate on the clean dev data, as the
re-scan measures it (``trigger_flip_rates``, the scan's seed), the live ones, and the output the
rule (``mitigate.mitigations.mbtsad.export_choice``, the module's own) picks from them. Clean dev only; the found triggers are the run's own (results.json). For
a run made before the export choice existed, e.g.:

    python scripts/export_choice_check.py runs/eval/clean_badnet_imb_s43 runs/data/sst2_88_12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mitigate.data.datamodule import BackdoorDataModule
from mitigate.guard import collapse_reason, score
from mitigate.inference import clean_report
from mitigate.loading import load_classifier
from mitigate.mitigations.detection import Suspect, trigger_flip_rates
from mitigate.mitigations.mbtsad.export_choice import choose_output, live_triggers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `mitigate clean` run folder (results.json, model/, teacher/)")
    parser.add_argument("data", help="its clean data (folder or name under $MITIGATE_DATA_DIR)")
    parser.add_argument("--live-flip", type=float, default=0.5, help="the recipe's model.live_flip")
    parser.add_argument("--max-cacc-drop", type=float, default=5.0, help="the recipe's model.max_cacc_drop")
    parser.add_argument("--max-class-share", type=float, default=0.95, help="the recipe's model.max_class_share")
    args = parser.parse_args()
    report = json.loads((args.run / "results.json").read_text())["report"]
    scan = report["trigger_scan"]
    seed = scan["settings"].get("seed", (scan["settings"].get("inversion") or {}).get("seed", 42))  # as the module reads it
    suspects = [Suspect(t, tuple(ids), c, 0.0, 0.0, 0, 0.0)
                for t, ids, c in zip(scan["suspects"], scan["suspect_ids"], scan["suspect_labels"])]
    dm = BackdoorDataModule(args.data, tokenizer=str(args.run / "model"), train_set="clean", seed=42)
    bound = score(report["suspicious_dev"]) - args.max_cacc_drop
    evidence = {}
    for name in ("model", "teacher"):
        model = load_classifier(str(args.run / name), num_labels=dm.num_classes).eval()
        flips = trigger_flip_rates(model, dm.tokenizer, dm.examples("dev"), suspects, seed)
        dev = clean_report(model, dm.dataset("dev"), dm.tokenizer.pad_token_id)
        evidence[name] = {"flips": flips, "collapse": collapse_reason(dev, args.max_class_share, bound),
                          "live": live_triggers([s.text for s in suspects], flips, args.live_flip)}
        print(f"{name}: dev {dev.get('metric', 'cacc')} {score(dev):.2f} (bound {bound:.2f}); guard: "
              f"{evidence[name]['collapse'] or 'passes'}; {len(evidence[name]['live'])} live trigger(s)")
    print("\n| found trigger | flips to | model/ | teacher/ |\n| --- | --- | --- | --- |")
    for s, a, b in zip(suspects, evidence["model"]["flips"], evidence["teacher"]["flips"]):
        print(f"| {s.text} | {s.label} | {100 * a:.1f} | {100 * b:.1f} |")
    pick, why = choose_output(evidence["model"], evidence["teacher"])
    print(f"\nthe rule (live >= {100 * args.live_flip:.0f}%) outputs: {'model' if pick == 'student' else 'teacher'}/ ({why})")


if __name__ == "__main__":
    main()
