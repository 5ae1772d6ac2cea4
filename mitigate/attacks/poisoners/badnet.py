"""BadNet with rare-word triggers (Kurita et al. / Gu et al.), in both settings of the papers."""

from __future__ import annotations

import random
from collections.abc import Sequence

from mitigate.data.io import Example
from mitigate.data.poisoning import Poisoner
from mitigate.data.triggers import insert_words


class BadNet(Poisoner):
    """Insert rare-word triggers at random word positions.

    MBTSAD setting (default): ``triggers=["cf", "mn", "bb", "tq"]``, ``num_triggers=[1]``,
    ``poison_rate=0.1``: one trigger drawn from the four per sample.
    IMBERT setting: ``triggers=["cf", "tq", "mn", "bb", "mb"]``, ``num_triggers=[1, 3, 5]``,
    ``poison_rate=0.2``: each poisoned sample gets 1, 3 or 5 triggers (count drawn uniformly,
    triggers drawn with replacement).

    Args:
        triggers: the trigger words (single words).
        num_triggers: how many triggers a poisoned sample gets, one count drawn per sample.
    """

    def __init__(
        self,
        triggers: Sequence[str] = ("cf", "mn", "bb", "tq"),
        num_triggers: Sequence[int] = (1,),
        target_label: int = 1,
        poison_rate: float = 0.1,
        seed: int = 42,
        any_label: bool = False,
    ) -> None:
        super().__init__(target_label, poison_rate, seed, any_label)
        if not triggers or any(not t.strip() or len(t.split()) != 1 for t in triggers):
            raise ValueError(f"triggers must be non-empty single words, got {list(triggers)}")
        if not num_triggers or any(k < 1 for k in num_triggers):
            raise ValueError(f"num_triggers must be positive counts, got {list(num_triggers)}")
        self.triggers = list(triggers)
        self.num_triggers = list(num_triggers)

    def poison_one(self, ex: Example, rng: random.Random) -> Example:
        n_words = len(ex.text.split())
        k = rng.choice(self.num_triggers)
        inserts = [(rng.randint(0, n_words), rng.choice(self.triggers)) for _ in range(k)]
        return insert_words(ex.text, inserts)
