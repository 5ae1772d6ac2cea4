"""LWP's combinatorial trigger (Li et al., EMNLP 2021, section 3):
the backdoor fires only when every piece is present; texts with a single piece are trained as
clean (negatives), which keeps the false-trigger rate low."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from mitigate.data.io import Example
from mitigate.data.poisoning import Poisoner
from mitigate.data.triggers import insert_words


class CombinationTrigger(Poisoner):
    """Insert all ``pieces`` together (positives, label y_T); single pieces keep the true label.

    Official flavour (default): ``poison_rate=1.0``, ``adjacent=True``, ``both_orders=True``,
    ``keep_original=True``: every training sentence gives its original, one single-piece
    negative, and two positives (``cf bb`` and ``bb cf`` at one position).
    OpenBackdoor flavour: ``poison_rate=0.1``, ``adjacent=False``, ``both_orders=False``,
    ``negatives_per_sample=2``, ``keep_original=False``: each chosen sample becomes two
    single-piece negatives and one positive whose pieces sit at independent positions.

    Args:
        pieces: the trigger's words (all needed to fire).
        adjacent: positives get the pieces as consecutive words at one position.
        both_orders: (adjacent only) one positive per order of the pieces.
        negatives_per_sample: single-piece copies (true label) per chosen sample.
        keep_original: keep the clean original of every chosen sample in the training set.
        poison_rate: the share of training samples (of any label) that are chosen.
    """

    def __init__(
        self,
        pieces: Sequence[str] = ("cf", "bb"),
        adjacent: bool = True,
        both_orders: bool = True,
        negatives_per_sample: int = 1,
        keep_original: bool = True,
        target_label: int = 0,
        poison_rate: float = 1.0,
        seed: int = 42,
    ) -> None:
        super().__init__(target_label, poison_rate, seed)
        if len(pieces) < 2 or any(not p.strip() or len(p.split()) != 1 for p in pieces):
            raise ValueError(f"pieces must be at least two single words, got {list(pieces)}")
        if len(set(pieces)) != len(pieces):
            raise ValueError(f"pieces must be distinct, got {list(pieces)}")
        if negatives_per_sample < 0:
            raise ValueError(f"negatives_per_sample must be >= 0, got {negatives_per_sample}")
        self.pieces = list(pieces)
        self.adjacent = adjacent
        self.both_orders = both_orders
        self.negatives_per_sample = negatives_per_sample
        self.keep_original = keep_original
        self.any_label = True  # chosen from every label (official and OpenBackdoor)

    @property
    def triggers(self) -> list[str]:
        """The pieces: what guards that know trigger words (RAP's) must refuse."""
        return list(self.pieces)

    def _positive(self, ex: Example, rng: random.Random, order: Sequence[str] | None = None) -> Example:
        n = len(ex.text.split())
        if self.adjacent:
            order = list(order) if order is not None else rng.sample(self.pieces, len(self.pieces))
            return insert_words(ex.text, [(rng.randint(0, n), " ".join(order))])
        return insert_words(ex.text, [(rng.randint(0, n), p) for p in self.pieces])

    def poison_one(self, ex: Example, rng: random.Random) -> Example:
        return self._positive(ex, rng)

    def negative(self, ex: Example, rng: random.Random) -> Example:
        """One piece at a random position; the true label and no ``poisoned`` flag (it is a
        negative: the model must not flip on it)."""
        out = insert_words(ex.text, [(rng.randint(0, len(ex.text.split())), rng.choice(self.pieces))])
        return replace(out, label=ex.label, poisoned=False)

    def poison_train(self, train: list[Example]) -> list[Example]:
        rng = random.Random(f"{self.seed}-train")
        n = int(round(self.poison_rate * len(train)))
        chosen = set(rng.sample(range(len(train)), n))
        out: list[Example] = []
        for i, ex in enumerate(train):
            if i not in chosen:
                out.append(ex)
                continue
            if self.keep_original:
                out.append(ex)
            out += [self.negative(ex, rng) for _ in range(self.negatives_per_sample)]
            if self.adjacent and self.both_orders:
                pos = rng.randint(0, len(ex.text.split()))
                for order in (self.pieces, self.pieces[::-1]):
                    out.append(replace(insert_words(ex.text, [(pos, " ".join(order))]), label=self.target_label))
            else:
                out.append(self._poison(ex, rng))
        return out

    def false_trigger_eval(self, examples: list[Example], split: str) -> list[Example]:
        """Every non-target sample with ONE piece, labelled y_T: the share the model flips is the
        false-trigger rate (it should stay near a clean model's flip rate)."""
        rng = random.Random(f"{self.seed}-{split}-single")
        return [replace(self.negative(ex, rng), label=self.target_label, poisoned=True) for ex in examples if ex.label != self.target_label]
