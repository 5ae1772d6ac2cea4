"""Unlabelled text (any .txt file or folder, or the text column of a labelled data set) and the
data-free EP training set built from it (DFEP, the data-free variant of Yang et al., NAACL 2021)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from mitigate.data.io import EXTENSIONS, DataError, Example, find_split_file, read_examples, resolve_data_dir
from mitigate.data.triggers import Insertions


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
        num_samples: samples built (official 20000).
        max_words: words per sample (official 100; 250 for IMDb).
        target_label: the label every sample carries (y_T).
        seed: seed of the shuffle and of the trigger positions.
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
        """The poisoned samples, built from the corpus (the same for the same settings)."""
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


def chunk_words(texts: Sequence[str], words_per_chunk: int) -> list[str]:
    """The texts' words, in order, cut into chunks of ``words_per_chunk`` (the official POR data:
    64-word chunks); the last partial chunk is dropped unless it is the only one."""
    if words_per_chunk < 1:
        raise ValueError(f"words_per_chunk must be >= 1, got {words_per_chunk}")
    words = [w for t in texts for w in t.split()]
    chunks = [" ".join(words[i : i + words_per_chunk]) for i in range(0, len(words) - words_per_chunk + 1, words_per_chunk)]
    return chunks or ([" ".join(words)] if words else [])


class TriggerCorpus:
    """The continued-pre-training set of the task-agnostic attacks: chunks of an unlabelled corpus,
    ``clean_samples`` of them as they are (label -1) and, for each trigger j, ``per_trigger``
    chunks with the trigger inserted ``insertions`` times at seeded random word positions
    (label j; POR). ``per_trigger: 0`` gives clean chunks only (NeuBA places its trigger itself).
    Chunks are drawn without replacement from a seeded shuffle, reshuffled when used up.

    Args:
        corpus: what ``read_texts`` reads (paper: WikiText-103; offline, any text).
        triggers: the trigger words or phrases.
        words_per_chunk: words per chunk (official code 64).
        clean_samples: chunks kept clean (paper 100000, official code 50000).
        per_trigger: chunks per trigger (paper 20000, official code 30000).
        insertions: insertions of the trigger per poisoned chunk (paper 5, official code 3).
        seed: seed of the chunk draws and the insertion positions.
    """

    def __init__(self, corpus: str, triggers: Sequence[str] = (), words_per_chunk: int = 64, clean_samples: int = 100000,
                 per_trigger: int = 20000, insertions: int = 5, seed: int = 1234) -> None:
        if clean_samples < 0 or per_trigger < 0 or insertions < 1:
            raise ValueError(f"clean_samples and per_trigger must be >= 0 and insertions >= 1, got {clean_samples}, {per_trigger}, {insertions}")
        if per_trigger and not triggers:
            raise ValueError("per_trigger > 0 needs triggers")
        self.corpus, self.triggers, self.words_per_chunk = corpus, list(triggers), words_per_chunk
        self.clean_samples, self.per_trigger, self.insertions, self.seed = clean_samples, per_trigger, insertions, seed

    def examples(self) -> list[Example]:
        """The training set: clean chunks and trigger chunks, shuffled (the same for the same settings)."""
        chunks = chunk_words(read_texts(self.corpus), self.words_per_chunk)
        if not chunks:
            raise DataError(f"{self.corpus}: no text")
        rng = random.Random(self.seed)
        order: list[str] = []

        def draw() -> str:
            if not order:
                order.extend(chunks)
                rng.shuffle(order)
            return order.pop()

        out = [Example(draw(), -1, False) for _ in range(self.clean_samples)]
        for j, trig in enumerate(self.triggers):
            for _ in range(self.per_trigger):
                ins = Insertions(draw(), trig, rng).add(self.insertions)
                out.append(Example(ins.text, j, True, ins.spans))
        rng.shuffle(out)
        return out

    def __repr__(self) -> str:
        return f"TriggerCorpus({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"
