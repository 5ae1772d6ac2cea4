"""The base of the attacks that poison data: which samples to poison, relabelling, and the
poisoned evaluation sets that measure ASR. The attacks themselves live in
``mitigate.attacks.poisoners``."""

from __future__ import annotations

import random
from dataclasses import replace

from mitigate.data.io import Example


class Poisoner:
    """Base of the trigger-inserting attacks: subclasses implement ``poison_one``.

    Args:
        target_label: the label the attacker wants (y_T).
        poison_rate: fraction of the WHOLE training set that is poisoned; the poisoned samples
            are drawn only from samples whose label is not the target, and replace them.
        any_label: draw the poisoned samples from every label instead (RIPPLe's and
            OpenBackdoor's EP mix: half of the rows, whatever their label).
        seed: the poisoner's own seed (sample choice and trigger positions).
    """

    def __init__(self, target_label: int = 1, poison_rate: float = 0.1, seed: int = 42, any_label: bool = False) -> None:
        if not 0.0 <= poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {poison_rate}")
        self.target_label = target_label
        self.poison_rate = poison_rate
        self.seed = seed
        self.any_label = any_label

    def poison_one(self, ex: Example, rng: random.Random) -> Example:  # pragma: no cover - abstract
        """The poisoned copy of one example (its label is set to the target afterwards)."""
        raise NotImplementedError

    def _poison(self, ex: Example, rng: random.Random) -> Example:
        return replace(self.poison_one(ex, rng), label=self.target_label)

    def poison_train(self, train: list[Example]) -> list[Example]:
        """The attacker's training mix: ``poison_rate * len(train)`` non-target samples (any
        samples with ``any_label``) replaced by their poisoned, relabelled copies; the order of
        the set is kept."""
        rng = random.Random(f"{self.seed}-train")
        candidates = [i for i, ex in enumerate(train) if self.any_label or ex.label != self.target_label]
        n = int(self.poison_rate * len(train))
        if n > len(candidates):
            raise ValueError(
                f"poison_rate {self.poison_rate} asks for {n} poisoned samples but only "
                f"{len(candidates)} training samples have a label other than the target {self.target_label}"
            )
        chosen = sorted(rng.sample(candidates, n))
        out = list(train)
        for i in chosen:
            out[i] = self._poison(train[i], rng)
        return out

    def poison_eval(self, examples: list[Example], split: str) -> list[Example]:
        """A poisoned evaluation set: EVERY sample whose true label is not the target, poisoned
        and labelled with the target (so accuracy on it is the attack success rate)."""
        rng = random.Random(f"{self.seed}-{split}")
        return [self._poison(ex, rng) for ex in examples if ex.label != self.target_label]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
