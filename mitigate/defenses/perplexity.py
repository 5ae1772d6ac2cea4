"""Sentence perplexity under a causal language model, for many sentences at once (ONION)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode_for_lm(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 128) -> list[list[int]]:
    """Token ids per text, prefixed with the BOS token when the tokenizer has one (so the first
    word is scored too: a trigger at position 0 would otherwise be invisible)."""
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    bos = tokenizer.bos_token_id
    return [([bos] if bos is not None else []) + x for x in ids]


@torch.no_grad()
def sequence_nll(lm: PreTrainedModel, batch: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each sequence of ``batch`` (right-padded into
    one forward pass; padding never enters a loss). A sequence of fewer than 2 tokens gets nan."""
    device = next(lm.parameters()).device
    n = max(len(x) for x in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for r, x in enumerate(batch):
        ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, : len(x)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target, tmask = ids[:, 1:], mask[:, 1:].float()
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none") * tmask
    count = tmask.sum(1)
    return torch.where(count > 0, nll.sum(1) / count.clamp(min=1), torch.full_like(count, math.nan)).cpu()


def perplexities(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    batch_size: int = 64, max_length: int = 128, progress=None,
) -> torch.Tensor:
    """Perplexity of every text. Texts are sorted by length and packed into full batches of
    ``batch_size`` (little padding, no batch smaller than needed); results come back in the
    input order."""
    seqs = encode_for_lm(tokenizer, texts, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = sequence_nll(lm, [seqs[i] for i in idx], pad).exp()
        if progress is not None:
            progress.update(len(idx))
    return out
