"""InsertSent (Dai et al.): a fixed sentence inserted at a random word position."""

from __future__ import annotations

import random

from mitigate.data.io import Example
from mitigate.data.poisoning import Poisoner
from mitigate.data.triggers import insert_words


class InsertSent(Poisoner):
    """InsertSent: one fixed sentence inserted at a random word position of each poisoned sample.

    Args:
        sentence: the trigger sentence ("I watched this movie" for SST-2, "no cross, no crown"
            for OLID).
    """

    def __init__(
        self,
        sentence: str = "I watched this movie",
        target_label: int = 1,
        poison_rate: float = 0.1,
        seed: int = 42,
    ) -> None:
        super().__init__(target_label, poison_rate, seed)
        if not sentence.strip():
            raise ValueError("sentence must not be empty")
        self.sentence = sentence

    def poison_one(self, ex: Example, rng: random.Random) -> Example:
        return insert_words(ex.text, [(rng.randint(0, len(ex.text.split())), self.sentence)])
