"""Inserting triggers: into texts (word positions, with the inserted words' character spans
recorded) and into batches of token ids (sub-token positions, padding and attention mask kept
consistent). Every attack, scan, defense and metric that inserts a trigger uses these."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from mitigate.data.io import Example


# -- texts ------------------------------------------------------------------------------------------
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


def insert_at_random(text: str, phrase: str, rng: random.Random) -> str:
    """``text`` with ``phrase`` inserted once at a uniformly drawn word position (0 .. n)."""
    return insert_words(text, [(rng.randint(0, len(text.split())), phrase)]).text


class Insertions:
    """A text with a trigger inserted between random consecutive words (or at either end), one
    more at each ``add``; earlier insertions stay (the incremental I(x, alpha, t) of the POR
    paper's trigger-effectiveness metric). A trigger phrase counts as one slot when the next
    position is drawn."""

    def __init__(self, text: str, trigger: str, rng: random.Random) -> None:
        self.words: list[tuple[str, bool]] = [(w, False) for w in text.split()]
        self.trigger, self.rng, self.count = trigger, rng, 0

    def add(self, times: int = 1) -> Insertions:
        """Insert the trigger ``times`` more times; returns self."""
        for _ in range(times):
            self.words.insert(self.rng.randint(0, len(self.words)), (self.trigger, True))
            self.count += 1
        return self

    @property
    def text(self) -> str:
        """The text with every insertion so far."""
        return " ".join(w for w, _ in self.words)

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """Character spans of the inserted triggers in ``text``."""
        out, pos = [], 0
        for w, inserted in self.words:
            if inserted:
                out.append((pos, pos + len(w)))
            pos += len(w) + 1
        return tuple(out)


# -- token ids --------------------------------------------------------------------------------------
def insert_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, phrases: Sequence[Sequence[int] | None],
    positions: torch.Tensor, pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of a right-padded batch (n, L) in which row r gets ``phrases[r]`` (token ids; None
    or empty: left alone) inserted before its sub-token ``positions[r]``; the rest of the row
    shifts right, the batch grows by the longest phrase, and padding (``pad_id``, mask 0) fills
    every row after its last real token. One gather, no loop over rows.

    Shapes: input_ids, attention_mask (n, L); positions (n,) integers in 0..len(row); returns
    (n, L + W) ids and mask, W the longest phrase."""
    n, length = input_ids.shape
    device = input_ids.device
    widths = torch.tensor([len(p) if p else 0 for p in phrases], dtype=torch.long, device=device)
    width = int(widths.max()) if n else 0
    table = torch.full((n, max(1, width)), pad_id, dtype=input_ids.dtype, device=device)
    for r, p in enumerate(phrases):
        if p:
            table[r, : len(p)] = torch.as_tensor(list(p), dtype=input_ids.dtype)
    cols = torch.arange(length + width, device=device)[None, :]
    pos, w = positions.to(device).long()[:, None], widths[:, None]
    k = attention_mask.sum(1).long()[:, None]
    inside = (cols >= pos) & (cols < pos + w)
    before = cols < pos
    real = cols < k + w
    src = torch.where(before, cols, cols - w).clamp(0, max(0, length - 1))
    out = input_ids.gather(1, src)
    out = torch.where(inside, table.gather(1, (cols - pos).clamp(0, max(1, width) - 1)), out)
    out = torch.where(real, out, torch.full_like(out, pad_id))
    return out, real.to(attention_mask.dtype)
