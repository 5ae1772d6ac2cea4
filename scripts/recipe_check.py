"""Run one quick instance of every recipe family on small slices of the real data, and compare
two such runs number for number (for a refactor that must not change any result).

    python scripts/recipe_check.py run OUT [--only NAME ...]     # every family, into OUT/<name>
    python scripts/recipe_check.py compare OUT_A OUT_B            # metrics and choices, A vs B

Each family is the shipped recipe itself with its data slices (``$MITIGATE_DATA_DIR`` pointed
at OUT/data: SST-2 and OLID, 640 train / 128 dev / 128 test lines each), the models it needs
taken from earlier families in OUT, and a step cap where the recipe trains on a corpus or for
a fixed number of steps. Timings are not compared; everything else in results.json is
(metrics, and the choices of the run's report). The collapse guards are off (a few steps
do not make a usable model; equality is what is checked). CPU, about 30 minutes in all.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SLICES = {"train": 640, "dev": 128, "test": 128}

#: name -> (subcommand, recipe, extra arguments); {out} is the run root, models of earlier
#: families are {out}/<name>/model
FAMILIES: dict[str, tuple[str, str, list[str]]] = {
    "clean_sst2": ("fit", "clean_sst2", []),
    "badnet_sst2": ("fit", "badnet_sst2", []),
    "insertsent_sst2": ("fit", "insertsent_sst2", []),
    "badnet_olid": ("fit", "badnet_olid", []),
    "ep_sst2": ("fit", "ep_sst2", ["--model.init_args.model", "{out}/clean_sst2/model"]),
    "ep_datafree_sst2": ("fit", "ep_datafree_sst2", ["--model.init_args.model", "{out}/clean_sst2/model", "--trainer.max_steps", "3"]),
    "lwp_sst2": ("fit", "lwp_sst2", []),
    "ripples_sst2": ("fit", "ripples_sst2", ["--model.init_args.surgery_source", "{out}/clean_sst2/model", "--trainer.max_steps", "4",
                                             "--trainer.val_check_interval", "2"]),
    "ripples_victim_sst2": ("fit", "ripples_victim_sst2", ["--model.init_args.model", "{out}/ripples_sst2/model"]),
    "por_encoder": ("fit", "por2_encoder", ["--trainer.max_steps", "3"]),
    "por_sst2": ("fit", "por2_sst2", ["--model.init_args.model", "{out}/por_encoder/model"]),
    "neuba_encoder": ("fit", "neuba_encoder", ["--trainer.max_steps", "3"]),
    "neuba_sst2": ("fit", "neuba_sst2", ["--model.init_args.model", "{out}/neuba_encoder/model"]),
    "cft_sst2": ("fit", "cft_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "tsft_sst2": ("fit", "tsft_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "mbtsad_sst2": ("fit", "mbtsad_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "reinit_sst2": ("fit", "reinit_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "fine_pruning_sst2": ("fit", "fine_pruning_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "fine_mixing_sst2": ("fit", "fine_mixing_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "fine_purifying_sst2": ("fit", "fine_purifying_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "epur_sst2": ("fit", "epur_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
    "defend_quick_sst2": ("test", "defend_quick_sst2", ["--model.init_args.model", "{out}/badnet_sst2/model"]),
}

#: the collapse guards' settings, off (the default: the export's one-class check)
NO_GUARDS = {
    "mbtsad_sst2": ["--export.max_class_share", "null", "--model.init_args.max_class_share", "null",
                    "--model.init_args.max_cacc_drop", "100", "--model.init_args.probe_cacc_drop", "10"],
    "por_encoder": [], "neuba_encoder": [],
}

#: results.json keys (or report keys) that measure time, not behaviour
TIMING = ("wall_s", "seconds", "samples_per_s", "calib_s", "fit_wall_s", "transform_seconds", "fisher_seconds")


def make_slices(src: Path, dst: Path) -> None:
    """The first lines of each split of SST-2 and OLID (the files as they are)."""
    for name in ("sst2", "olid"):
        for split, n in SLICES.items():
            lines = (src / name / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
            out = dst / name / f"{split}.tsv"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")


def run(out: Path, only: list[str] | None) -> int:
    root = Path(__file__).resolve().parents[1]
    src = Path(os.environ.get("MITIGATE_DATA_DIR", root.parent / "shared" / "data"))
    out = out.resolve()
    make_slices(src, out / "data")
    # this checkout's code, whatever is installed
    env = {**os.environ, "MITIGATE_DATA_DIR": str(out / "data"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    failed = []
    for name, (sub, recipe, extra) in FAMILIES.items():
        if only and name not in only:
            continue
        folder = out / name
        guards = NO_GUARDS.get(name, ["--export.max_class_share", "null"]) if sub == "fit" else []
        cmd = [sys.executable, "-m", "mitigate", sub, "--config", str(root / "recipes" / f"{recipe}.yaml"),
               "--trainer.default_root_dir", str(folder), "--overwrite", "true", *guards, *[a.format(out=out) for a in extra]]
        start = time.perf_counter()
        with (out / f"{name}.log").open("w") as log:
            rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root).returncode
        print(f"{name:22s} rc {rc}  {time.perf_counter() - start:6.1f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


def flatten(value, prefix: str = "") -> dict[str, object]:
    """A nested results.json as path -> leaf value, timings left out."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if any(str(k).endswith(t) for t in TIMING):
                continue
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}/"))
        return out
    return {prefix.rstrip("/"): value}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def compare(a: Path, b: Path) -> int:
    differ = 0
    for name in FAMILIES:
        fa, fb = a / name / "results.json", b / name / "results.json"
        wa, wb = a / name / "model" / "model.safetensors", b / name / "model" / "model.safetensors"
        if not fa.is_file() and not fb.is_file() and wa.is_file() and wb.is_file():  # encoders: no test, compare weights
            same_weights = wa.read_bytes() == wb.read_bytes()
            print(f"{name:22s} {'identical' if same_weights else 'different'} exported weights (no test run)")
            differ += not same_weights
            continue
        if not fa.is_file() or not fb.is_file():
            print(f"{name:22s} missing in {'A' if not fa.is_file() else 'B'}")
            differ += 1
            continue
        ra, rb = flatten(json.loads(fa.read_text())), flatten(json.loads(fb.read_text()))
        diffs = [k for k in sorted(set(ra) | set(rb)) if not same(ra.get(k), rb.get(k))]
        metrics = sum(1 for k in ra if k.startswith("test/"))
        print(f"{name:22s} {'identical' if not diffs else f'{len(diffs)} differences'} ({metrics} metrics, {len(ra)} values)")
        for k in diffs[:12]:
            print(f"    {k}: {ra.get(k)!r} vs {rb.get(k)!r}")
        differ += bool(diffs)
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--only", nargs="*")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    return run(args.out, args.only) if args.cmd == "run" else compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
