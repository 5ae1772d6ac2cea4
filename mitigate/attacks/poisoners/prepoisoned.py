"""Attacks the toolkit cannot generate (syntactic paraphrase, style transfer) as files."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from mitigate.data.io import DataError, Example, find_split_file, read_examples, resolve_data_dir
from mitigate.data.poisoning import Poisoner


class PrePoisoned(Poisoner):
    """Poisoned samples read from a folder with ``train`` and ``test`` files (``dev`` optional)
    in the same formats as clean data. Every sample in them is poisoned; its label must be the
    target label for the test files (they measure ASR); train samples are mixed in as given.

    The training mix replaces ``poison_rate * len(train)`` non-target clean samples with the
    first poisoned train samples (all of them when ``poison_rate`` is None). No trigger
    positions are known for such attacks.

    Args:
        path: the folder of poisoned files (or a name under ``$MITIGATE_DATA_DIR``).
        poison_rate: the share of the training set replaced by poisoned samples (None: all of
            the poisoned train file).
        text_column: the column (field) of the files that holds the text.
        label_column: the column (field) that holds the integer label.
    """

    def __init__(
        self,
        path: str,
        target_label: int = 1,
        poison_rate: float | None = None,
        seed: int = 42,
        text_column: str = "sentence",
        label_column: str = "label",
    ) -> None:
        super().__init__(target_label, 0.0 if poison_rate is None else poison_rate, seed)
        folder = resolve_data_dir(path)
        if folder is None:
            raise DataError(f"{path}: no such folder (also looked under $MITIGATE_DATA_DIR)")
        self.path = str(folder)
        self.use_all = poison_rate is None
        self._columns = (text_column, label_column)

    def _read(self, split: str) -> tuple[list[Example], Path]:
        file = find_split_file(Path(self.path), split)
        return [replace(ex, poisoned=True) for ex in read_examples(file, *self._columns)], file

    def poison_train(self, train: list[Example]) -> list[Example]:
        poisoned, _ = self._read("train")
        n = len(poisoned) if self.use_all else int(self.poison_rate * len(train))
        if n > len(poisoned):
            raise ValueError(f"poison_rate {self.poison_rate} asks for {n} poisoned samples, {self.path} has {len(poisoned)}")
        rng = random.Random(f"{self.seed}-train")
        candidates = [i for i, ex in enumerate(train) if ex.label != self.target_label]
        if n > len(candidates):
            raise ValueError(f"{n} poisoned samples would replace more than the {len(candidates)} non-target samples")
        out = list(train)
        for i, p in zip(sorted(rng.sample(candidates, n)), poisoned[:n]):
            out[i] = p
        return out

    def poison_eval(self, examples: list[Example], split: str) -> list[Example]:
        try:
            poisoned, file = self._read(split)
        except DataError:
            if split == "dev":
                return []
            raise
        for i, ex in enumerate(poisoned):
            if ex.label != self.target_label:
                where = f"{file}:{ex.line}" if ex.line else f"{file}: example {i + 1}"
                raise DataError(f"{where}: poisoned test label {ex.label} is not the target {self.target_label}")
        return poisoned
