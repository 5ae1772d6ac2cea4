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


def onion_variants(text: str) -> list[str]:
    """The n sentences of ``text`` with one word left out each (word i removed in entry i)."""
    words = text.split()
    return [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]


def onion_suspicion(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    batch_size: int = 64, max_length: int = 128, progress=None,
) -> list[list[float]]:
    """ONION's f_i = p_0 − p_i per word of every text (p_0 = perplexity of the text, p_i = of
    the text without word i). The n+1 variants of ALL texts are scored together, packed into
    full batches. A word whose removal leaves nothing to score gets f = 0."""
    variants, owners = [], []
    for t, text in enumerate(texts):
        for v in [text, *onion_variants(text)]:
            variants.append(v)
            owners.append(t)
    ppl = perplexities(lm, tokenizer, variants, batch_size, max_length, progress).tolist()
    out: list[list[float]] = [[] for _ in texts]
    base = {}
    for t, p in zip(owners, ppl):
        if t not in base:
            base[t] = p
        else:
            out[t].append(0.0 if math.isnan(p) or math.isnan(base[t]) else base[t] - p)
    return out


def remove_words(text: str, suspicion: Sequence[float], bar: float) -> str:
    """``text`` without the words whose suspicion exceeds ``bar``."""
    return " ".join(w for w, f in zip(text.split(), suspicion) if not f > bar)


def cache_kwarg(lm) -> str:
    """The keyword the LM's forward takes its key/value cache by (transformers 5.2x renames
    ``past_key_values`` to ``cache``; the old name warns until its removal)."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def onion_suspicion_cached(
    lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
    batch_size: int = 64, max_length: int = 128, progress=None,
) -> list[list[float]]:
    """``onion_suspicion`` (same tokens, same scores up to float rounding) without recomputing
    the prefix each variant shares with its full text.

    A variant without word i has the same tokens as the full text up to some position c (found
    on the token ids, so any tokenizer is handled exactly). One pass over the full texts gives
    their key/value cache and logits: the variant's targets 1..c-1 are the full text's, target c
    is scored from the full text's logits at c-1, and only the tokens after c are run, on top
    of the full text's cache cut at c (a padded cache with an attention mask and explicit
    position ids, so variants of several texts share a batch). Tokens computed per text:
    n + sum_i (tokens after word i), about half of the (n+1) * n of scoring every variant."""
    from transformers import DynamicCache

    device = next(lm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fulls = encode_for_lm(tokenizer, texts, max_length)
    variants = [encode_for_lm(tokenizer, onion_variants(t), max_length) if t.split() else [] for t in texts]
    out: list[list[float]] = [[] for _ in texts]
    key = cache_kwarg(lm)
    order = sorted(range(len(texts)), key=lambda i: len(fulls[i]))
    for g in range(0, len(order), batch_size):
        group = order[g : g + batch_size]
        L = max(len(fulls[t]) for t in group)
        ids = torch.full((len(group), L), pad, dtype=torch.long)
        mask = torch.zeros((len(group), L), dtype=torch.long)
        for r, t in enumerate(group):
            ids[r, : len(fulls[t])] = torch.tensor(fulls[t])
            mask[r, : len(fulls[t])] = 1
        res = lm(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
        logits = res.logits.float()
        lse = logits.logsumexp(-1)
        past = getattr(res, "cache", None) or res.past_key_values
        kv = [(layer.keys, layer.values) for layer in past.layers]
        # the full texts' token NLLs (target t scored at position t-1), prefix sums
        tgt = ids[:, 1:].to(device)
        tok_nll = (lse[:, :-1] - logits[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)) * mask[:, 1:].to(device)
        csum = torch.cat([torch.zeros(len(group), 1, device=device), tok_nll.cumsum(1)], 1).cpu()  # csum[r, k] = sum of targets 1..k
        full_nll = [float(csum[r, len(fulls[t]) - 1]) / (len(fulls[t]) - 1) if len(fulls[t]) > 1 else math.nan for r, t in enumerate(group)]
        # every variant: the part scored from the full pass, and its suffix job
        sums: dict[tuple[int, int], float] = {}
        jobs = []  # (row, text, variant, c, inputs, targets)
        at_c = []  # (text, variant, row, position c-1, token v[c]): target c scored from the full pass's logits
        for r, t in enumerate(group):
            for i, v in enumerate(variants[t]):
                c = common_prefix(fulls[t], v)
                sums[(t, i)] = float(csum[r, max(0, min(c, len(v)) - 1)]) if c >= 1 else 0.0  # targets 1..c-1
                if 1 <= c < len(v):
                    at_c.append((t, i, r, c - 1, v[c]))
                if len(v) - 1 > c:  # targets c+1.. from positions c..: run tokens c..len-2 on the cache cut at c
                    jobs.append((r, t, i, c, v[c : len(v) - 1], v[c + 1 :]))
        if at_c:  # one gather for all of them (no per-variant device sync)
            rr, pp, tt = (torch.tensor([x[k] for x in at_c], device=device) for k in (2, 3, 4))
            for (t, i, *_), nll in zip(at_c, (lse[rr, pp] - logits[rr, pp, tt]).tolist()):
                sums[(t, i)] += nll
        del logits
        jobs.sort(key=lambda j: len(j[4]))
        for s0 in range(0, len(jobs), batch_size):
            chunk = jobs[s0 : s0 + batch_size]
            C = max(j[3] for j in chunk)
            S = max(len(j[4]) for j in chunk)
            x = torch.full((len(chunk), S), pad, dtype=torch.long)
            am = torch.zeros((len(chunk), C + S), dtype=torch.long)
            pos = torch.zeros((len(chunk), S), dtype=torch.long)
            for b, (_, _, _, c, inp, _) in enumerate(chunk):
                x[b, : len(inp)] = torch.tensor(inp)
                am[b, :c] = 1
                am[b, C : C + len(inp)] = 1
                pos[b] = c + torch.arange(S)
            rows = torch.tensor([j[0] for j in chunk], device=device)
            cache = DynamicCache(ddp_cache_data=[(k[rows, :, :C], v[rows, :, :C]) for k, v in kv]) if C > 0 else None
            lg = lm(input_ids=x.to(device), attention_mask=am.to(device), position_ids=pos.to(device), **{key: cache}).logits.float()
            y = torch.full((len(chunk), S), -100, dtype=torch.long)
            for b, (*_, inp, targets) in enumerate(chunk):
                y[b, : len(inp)] = torch.tensor(targets)
            nll = F.cross_entropy(lg.transpose(1, 2), y.to(device), reduction="none", ignore_index=-100).sum(1).tolist()
            for (_, t, i, *_), v in zip(chunk, nll):
                sums[(t, i)] += v
        for r, t in enumerate(group):
            base = math.exp(full_nll[r]) if not math.isnan(full_nll[r]) else math.nan
            for i, v in enumerate(variants[t]):
                p = math.exp(sums[(t, i)] / (len(v) - 1)) if len(v) > 1 else math.nan
                out[t].append(0.0 if math.isnan(p) or math.isnan(base) else base - p)
        if progress is not None:
            progress.update(sum(len(variants[t]) + 1 for t in group))
    return out
