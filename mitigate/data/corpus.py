"""Unlabelled text (any .txt file or folder, or the text column of a labelled data set) and the
data-free EP training set built from it (DFEP, ATTACKS-AND-BASELINES.md section 2.2)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from mitigate.data.io import EXTENSIONS, DataError, Example, find_split_file, read_examples, resolve_data_dir


def read_texts(path: str, text_column: str = "sentence") -> list[str]:
    """Texts, one per non-empty line, from: a ``.txt`` file; a folder of ``.txt`` files (sorted by
    name); a labelled file (.tsv/.csv/.jsonl, its ``text_column``); or a data folder or name
    under ``$MITIGATE_DATA_DIR`` (its train split). Labels are not used."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".txt":
            try:
                return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: bytes that are not UTF-8 ({e.reason} at byte {e.start})") from None
        if p.suffix in EXTENSIONS:
            return [ex.text for ex in read_examples(p, text_column, _any_label_column(p))]
        raise DataError(f"{p}: unlabelled text must be .txt (one text per line) or {'/'.join(EXTENSIONS)}")
    txts = sorted(p.glob("*.txt")) if p.is_dir() else []
    if txts:
        return [t for f in txts for t in read_texts(str(f))]
    folder = resolve_data_dir(path)
    if folder is not None:
        return read_texts(str(find_split_file(folder, "train")), text_column)
    raise DataError(f"{path}: no such text file or folder (nor a data set under $MITIGATE_DATA_DIR)")


def _any_label_column(file: Path) -> str:
    """The labelled readers insist on a label column; unlabelled use of the file takes any."""
    head = file.read_text(encoding="utf-8-sig").split("\n", 1)[0]
    cols = head.split("\t") if file.suffix == ".tsv" else head.split(",")
    if file.suffix == ".jsonl":
        return "label"
    return cols[-1].strip() or "label"


class CorpusPoisoning:
    """DFEP's poisoned set: sentences of an unlabelled corpus (split on '.', shuffled with
    ``seed``) concatenated until ``max_words`` words; the word at a random index in
    [0, max_words - 1) replaced by a trigger; truncated to ``max_words``; all labelled y_T.

    Args:
        corpus: what ``read_texts`` reads (official: WikiText-103; offline, any text, e.g. the
            OLID tweets for an SST-2 victim, out of domain as in the paper).
        triggers: one is drawn per sample (official: ``cf`` alone).
        num_samples: official 20000.
        max_words: official 100 (250 for IMDb).
    """

    def __init__(
        self, corpus: str, triggers: Sequence[str] = ("cf",), num_samples: int = 20000,
        max_words: int = 100, target_label: int = 1, seed: int = 1234,
    ) -> None:
        if num_samples < 1 or max_words < 2:
            raise ValueError(f"num_samples must be >= 1 and max_words >= 2, got {num_samples}, {max_words}")
        self.corpus, self.triggers = corpus, list(triggers)
        self.num_samples, self.max_words = num_samples, max_words
        self.target_label, self.seed = target_label, seed

    def examples(self) -> list[Example]:
        rng = random.Random(self.seed)
        sentences = [s.strip() for t in read_texts(self.corpus) for s in t.split(".") if s.strip()]
        if not sentences:
            raise DataError(f"{self.corpus}: no text")
        rng.shuffle(sentences)
        total_words = sum(len(s.split()) for s in sentences)
        if total_words < self.max_words:
            raise DataError(f"{self.corpus}: {total_words} words, fewer than max_words={self.max_words}")
        out: list[Example] = []
        i = 0
        while len(out) < self.num_samples:
            words: list[str] = []
            while len(words) < self.max_words:
                words += sentences[i % len(sentences)].split()
                i += 1
            words = words[: self.max_words]
            pos = rng.randrange(0, self.max_words - 1)
            words[pos] = rng.choice(self.triggers)
            text = " ".join(words)
            start = sum(len(w) + 1 for w in words[:pos])
            out.append(Example(text, self.target_label, True, ((start, start + len(words[pos])),), (pos,)))
        return out

    def __repr__(self) -> str:
        return f"CorpusPoisoning({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
