"""Write an imbalanced copy of a tab-separated data set (``sentence<TAB>label`` files with a
header, train/dev/test): every split keeps all samples of the other classes and a seeded
sample of ``--minority`` so that it makes up ``--share`` of the split. The evaluation victim
of an imbalanced binary task (docs/clean.md) is trained on SST-2 made 88/12 this way:

    python scripts/make_imbalanced.py $MITIGATE_DATA_DIR/sst2 runs/data/sst2_88_12 --minority 1 --share 0.12
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with train.tsv, dev.tsv, test.tsv")
    parser.add_argument("out", type=Path, help="folder to write the imbalanced copy to")
    parser.add_argument("--minority", type=int, default=1, help="the class made rare")
    parser.add_argument("--share", type=float, default=0.12, help="its share of each split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        with open(args.source / f"{split}.tsv", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        header, body = rows[0], rows[1:]
        minority = [r for r in body if int(r[1].strip()) == args.minority]
        rest = [r for r in body if int(r[1].strip()) != args.minority]
        keep = round(args.share * len(rest) / (1.0 - args.share))
        picked = random.Random(f"{args.seed}-{split}").sample(minority, min(keep, len(minority)))
        out = rest + picked
        random.Random(f"{args.seed}-{split}-order").shuffle(out)
        with open(args.out / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
            w.writerows([header] + out)
        print(f"{split}: {len(rest)} + {len(picked)} of class {args.minority} ({100 * len(picked) / len(out):.1f}%)")


if __name__ == "__main__":
    main()
