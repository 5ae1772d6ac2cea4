"""What every poisoner shares: picking the samples to poison and inserting words at recorded positions."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from mitigate.data.io import Example


def insert_words(text: str, inserts: Sequence[tuple[int, str]]) -> Example:
    """Insert trigger phrases into ``text`` (split on whitespace) at word positions.

    ``inserts`` is a list of (position in the original word list, phrase); phrases at the
    same position keep their order. Returns an unlabelled Example whose trigger_spans and
    trigger_words locate every inserted word in the new text (text is re-joined with single
    spaces, so character spans are exact).
    """
    words = text.split()
    slots: list[list[str]] = [[] for _ in range(len(words) + 1)]
    for pos, phrase in inserts:
        if not 0 <= pos <= len(words):
            raise ValueError(f"insert position {pos} outside 0..{len(words)}")
        slots[pos].extend(phrase.split())
    out: list[str] = []
    trigger_words: list[int] = []
    for i in range(len(words) + 1):
        for w in slots[i]:
            trigger_words.append(len(out))
            out.append(w)
        if i < len(words):
            out.append(words[i])
    starts, c = [], 0
    for w in out:
        starts.append(c)
        c += len(w) + 1
    spans = tuple((starts[i], starts[i] + len(out[i])) for i in trigger_words)
    return Example(" ".join(out), -1, True, spans, tuple(trigger_words))


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
