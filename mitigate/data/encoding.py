"""Tokenising examples once, locating trigger sub-tokens, and padding batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from mitigate.data.io import Example


class EncodedDataset(Dataset):
    """Examples tokenised up front (no per-epoch work). Each item holds ``input_ids``,
    ``labels``, ``poisoned``, ``index`` (its position in ``examples``: test-time defenses
    look up the text with it) and ``trigger_mask`` (1 on every sub-token that overlaps an
    inserted trigger word; the ground truth for top-K precision)."""

    def __init__(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int = 128):
        self.examples = list(examples)
        if not self.examples:  # e.g. no poisoner: no poisoned evaluation set
            self.input_ids, self.trigger_masks = [], []
            return
        enc = tokenizer(
            [ex.text for ex in self.examples],
            truncation=True,
            max_length=max_length,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        self.input_ids = enc["input_ids"]
        self.trigger_masks = [
            trigger_token_mask(offsets, special, ex.trigger_spans)
            for offsets, special, ex in zip(enc["offset_mapping"], enc["special_tokens_mask"], self.examples)
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {
            "input_ids": self.input_ids[i],
            "trigger_mask": self.trigger_masks[i],
            "labels": ex.label,
            "poisoned": ex.poisoned,
            "index": i,
        }

    def lengths(self) -> list[int]:
        """Sub-tokens per sample."""
        return [len(ids) for ids in self.input_ids]


def trigger_token_mask(
    offsets: Sequence[tuple[int, int]], special: Sequence[int], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """1 for each non-special sub-token whose character span overlaps a trigger span."""
    return [
        int(not sp and e > s and any(s < te and e > ts for ts, te in spans))
        for (s, e), sp in zip(offsets, special)
    ]


def trigger_positions(trigger_mask: torch.Tensor) -> list[list[int]]:
    """Sub-token positions of the triggers, per row of a (batch, length) mask."""
    return [row.nonzero().flatten().tolist() for row in trigger_mask]


class PadCollator:
    """Right-pads a list of dataset items into a batch of tensors."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(items), n), dtype=torch.long)
        trig = torch.zeros((len(items), n), dtype=torch.bool)
        for r, it in enumerate(items):
            k = len(it["input_ids"])
            ids[r, :k] = torch.tensor(it["input_ids"])
            attn[r, :k] = 1
            trig[r, :k] = torch.tensor(it["trigger_mask"], dtype=torch.bool)
        return {
            "input_ids": ids,
            "attention_mask": attn,
            "trigger_mask": trig,
            "labels": torch.tensor([it["labels"] for it in items]),
            "poisoned": torch.tensor([it["poisoned"] for it in items]),
            "index": torch.tensor([it.get("index", -1) for it in items]),
        }


class PairedDataset(Dataset):
    """Item i of ``primary`` with a partner from ``partner`` (a fixed seeded permutation, cycled
    when ``partner`` is shorter): two batches per step with one resumable loader."""

    def __init__(self, primary: EncodedDataset, partner: EncodedDataset, seed: int = 0) -> None:
        if not len(partner):
            raise ValueError("the partner set of a paired dataset is empty")
        self.primary, self.partner = primary, partner
        g = torch.Generator().manual_seed(seed * 7919 + 17)
        n = len(primary)
        self.partner_index = torch.cat([torch.randperm(len(partner), generator=g) for _ in range(n // len(partner) + 1)])[:n].tolist()

    def __len__(self) -> int:
        return len(self.primary)

    def __getitem__(self, i: int) -> dict:
        return {**self.primary[i], "partner": self.partner[self.partner_index[i]]}

    def lengths(self) -> list[int]:
        """Sub-tokens per sample of the primary set."""
        return self.primary.lengths()


class PairedCollator:
    """The primary items' batch, with the partners' batch under ``clean``."""

    def __init__(self, collate: PadCollator) -> None:
        self.collate = collate

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collate(items)
        batch["clean"] = self.collate([it["partner"] for it in items])
        return batch
