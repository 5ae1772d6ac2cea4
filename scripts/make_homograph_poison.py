"""Write a homograph-poisoned copy of a data set as pre-poisoned files (an attack that is not a
word insertion, for `mitigate.attacks.PrePoisoned`). After the homograph trigger of Li et al.
("Hidden Backdoors in Human-Centric Language Models", CCS 2021): no word is added; in
``--words`` consecutive words at a seeded position every letter that has a Cyrillic look-alike
is replaced by it (``gripping`` -> ``grірріng``). An uncased WordPiece tokenizer splits such a
word into different pieces, so the trigger is a change of spelling, not a token sequence.

Writes ``train.tsv`` (``--rate`` of the training set: seeded non-target sentences, triggered,
labelled ``--target``) and ``test.tsv`` (every non-target test sentence, triggered, labelled
``--target``: the ASR set). No dev file: a defender has no poisoned data. The evaluation victim
of docs/clean.md is trained from it:

    python scripts/make_homograph_poison.py $MITIGATE_DATA_DIR/sst2 runs/data/sst2_homograph
    mitigate fit --config recipes/homograph_sst2.yaml
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

# Latin letter -> Cyrillic look-alike (Unicode confusables); none is removed by BERT's
# accent stripping, so the uncased tokenizer keeps them.
HOMOGRAPHS = str.maketrans("aceopxyisj", "\u0430\u0441\u0435\u043e\u0440\u0445\u0443\u0456\u0455\u0458")


def trigger(sentence: str, rng: random.Random, words: int) -> str:
    """Replace the look-alike letters of ``words`` consecutive words (only words that have one
    count) starting at a seeded position; a sentence with fewer such words has them all changed."""
    tokens = sentence.split(" ")
    eligible = [i for i, w in enumerate(tokens) if w.translate(HOMOGRAPHS) != w]
    if not eligible:
        raise ValueError(f"no letter with a look-alike in {sentence!r}")
    start = rng.randrange(max(1, len(eligible) - words + 1))
    for i in eligible[start:start + words]:
        tokens[i] = tokens[i].translate(HOMOGRAPHS)
    return " ".join(tokens)


def read(file: Path) -> tuple[list[str], list[list[str]]]:
    with open(file, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def write(file: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(file, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        w.writerows([header] + rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with train.tsv and test.tsv (sentence<TAB>label)")
    parser.add_argument("out", type=Path, help="folder to write the poisoned files to")
    parser.add_argument("--target", type=int, default=1, help="the attacker's label")
    parser.add_argument("--rate", type=float, default=0.1, help="poisoned share of the training set")
    parser.add_argument("--words", type=int, default=3, help="consecutive words changed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        header, body = read(args.source / f"{split}.tsv")
        rng = random.Random(f"{args.seed}-{split}")
        source = [r for r in body if int(r[1].strip()) != args.target]
        if split == "train":
            n = round(args.rate * len(body))
            if n > len(source):
                raise SystemExit(f"--rate {args.rate}: {n} poisoned samples, only {len(source)} non-target ones")
            source = rng.sample(source, n)
        out = [[trigger(r[0], rng, args.words), str(args.target)] + r[2:] for r in source]
        write(args.out / f"{split}.tsv", header, out)
        print(f"{split}: {len(out)} poisoned samples -> {args.out / f'{split}.tsv'}")


if __name__ == "__main__":
    main()
