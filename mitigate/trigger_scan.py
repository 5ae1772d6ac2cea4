"""A defender's scan of the vocabulary for tokens that flip a classifier: inserted into clean
text, a backdoor trigger turns nearly every input into its target class, whatever the text
says; an ordinary word, even a strong one, turns only some. Uses clean held-out data only.

1. Candidates: every vocabulary token that is a whole word on its own (it tokenises back to
   itself), special tokens aside.
2. Carrier scan (cheap, all candidates): for each class c, the shortest held-out texts that the
   model gives to another class most confidently are the carriers; each candidate is inserted
   after the first token of each carrier, and scored by min over carriers of p(c).
3. Verification (expensive, the ``top_k`` best per class): each is inserted at a random word
   position into ``verify_samples`` held-out texts that the model does not give to c; its
   flip rate is the share that move to c.
4. A token is suspect when its flip rate is at least ``min_flip`` and the clean data does not
   back that class up: among the clean texts that contain it (at least ``min_support`` of
   them), fewer than ``support_share`` carry label c. A word that is a real feature of the
   task (a profanity in offensive-language data) is backed by the clean labels; a trigger,
   absent from clean data or spread over both labels, is not.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from mitigate.callbacks.progress import LogProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Suspect:
    """A token found to flip the model to ``label``."""

    token: str
    token_id: int
    label: int
    flip_rate: float
    carrier_score: float
    clean_count: int  # clean texts that contain the token
    clean_share: float  # share of those labelled ``label``

    def as_dict(self) -> dict:
        return asdict(self)


def whole_word_tokens(tokenizer) -> list[int]:
    """Ids of the tokens that are a word on their own: the tokenizer turns their text back into
    exactly that token (WordPiece "##" pieces and BPE continuations do not)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = [tokenizer.decode([i]).strip() for i in ids]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [i for i, t, e in zip(ids, texts, enc) if t and e == [i] and not (t.startswith("[") and t.endswith("]"))]


@torch.no_grad()
def predict_proba(model, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 128) -> torch.Tensor:
    """Class probabilities, batched shortest first, in input order (on the CPU)."""
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out[idx] = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().softmax(-1).cpu()
    return out


@torch.no_grad()
def carrier_scores(model, carriers: Sequence[Sequence[int]], candidates: torch.Tensor, label: int, batch_size: int = 1024) -> torch.Tensor:
    """min over carriers of p(label | carrier with the candidate inserted after its first
    token), for every candidate id. Carriers are token id lists with special tokens."""
    device = next(model.parameters()).device
    scores = torch.full((len(candidates),), float("inf"))
    bar = LogProgress(len(carriers) * len(candidates), f"trigger scan, class {label}: carrier pass")
    for carrier in carriers:
        carrier_t = torch.tensor(carrier)
        for s in range(0, len(candidates), batch_size):
            bar.update(len(candidates[s : s + batch_size]))
            cand = candidates[s : s + batch_size]
            seq = carrier_t.repeat(len(cand), 1)
            seq = torch.cat([seq[:, :1], cand[:, None], seq[:, 1:]], 1).to(device)
            p = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits.float().softmax(-1)[:, label].cpu()
            scores[s : s + batch_size] = torch.minimum(scores[s : s + batch_size], p)
    return scores


def insert_word(text: str, word: str, rng: random.Random) -> str:
    words = text.split()
    p = rng.randint(0, len(words))
    return " ".join(words[:p] + [word] + words[p:])


def flip_rate(model, tokenizer, texts: Sequence[str], word: str, label: int, seed: int = 0, **kw) -> float:
    """Share of ``texts`` (none predicted ``label``) predicted ``label`` once ``word`` is inserted
    at a random word position of each."""
    rng = random.Random(f"{seed}-{word}")
    probs = predict_proba(model, tokenizer, [insert_word(t, word, rng) for t in texts], **kw)
    return float((probs.argmax(-1) == label).float().mean())


def label_support(tokenizer, texts: Sequence[str], labels: Sequence[int], token_ids: Sequence[int]) -> dict[int, tuple[int, list[int]]]:
    """For each token id: how many clean texts contain it, and their labels."""
    wanted = set(token_ids)
    found: dict[int, list[int]] = {i: [] for i in wanted}
    for ids, y in zip(tokenizer(list(texts), add_special_tokens=False)["input_ids"], labels):
        for i in wanted.intersection(ids):
            found[i].append(y)
    return {i: (len(ys), ys) for i, ys in found.items()}


def scan_vocabulary(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    support_texts: Sequence[str] = (),
    support_labels: Sequence[int] = (),
    top_k: int = 32,
    carriers: int = 1,
    carrier_max_tokens: int = 10,
    verify_samples: int = 64,
    min_flip: float = 0.9,
    min_support: int = 5,
    support_share: float = 0.8,
    batch_size: int = 128,
    seed: int = 42,
) -> tuple[list[Suspect], list[dict]]:
    """Suspect tokens of ``model`` found with the clean held-out ``texts`` (and their labels:
    only to keep the scan on texts the model gets right), and every verified candidate as
    rows for a report. ``support_texts``/``support_labels``: all clean data the defender has
    (held-out and training subset), for the clean-label support of step 4."""
    was_training = model.training
    model.eval()
    try:
        candidates = torch.tensor(whole_word_tokens(tokenizer))
        probs = predict_proba(model, tokenizer, texts, batch_size)
        preds = probs.argmax(-1)
        lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
        rng = random.Random(f"{seed}-scan")
        suspects, rows = [], []
        for c in range(model.config.num_labels):
            others = [i for i in range(len(texts)) if preds[i] != c and preds[i] == labels[i]]
            short = [i for i in others if lengths[i] <= carrier_max_tokens] or sorted(others, key=lambda i: lengths[i])[:10]
            chosen = sorted(short, key=lambda i: float(probs[i, c]))[:carriers]
            if not chosen:
                continue
            carrier_ids = [tokenizer(texts[i])["input_ids"] for i in chosen]
            score = carrier_scores(model, carrier_ids, candidates, c, batch_size=max(batch_size, 512))
            top = score.topk(min(top_k, len(candidates)))
            verify = [texts[i] for i in rng.sample(others, min(verify_samples, len(others)))]
            top_ids = [int(candidates[j]) for j in top.indices]
            support = label_support(tokenizer, support_texts, support_labels, top_ids)
            bar = LogProgress(len(top_ids), f"trigger scan, class {c}: verifying")
            for tid, cs in zip(top_ids, top.values.tolist()):
                bar.update()
                word = tokenizer.decode([tid]).strip()
                rate = flip_rate(model, tokenizer, verify, word, c, seed=seed, batch_size=batch_size)
                count, ys = support[tid]
                share = sum(y == c for y in ys) / count if count else 0.0
                backed = count >= min_support and share >= support_share
                row = Suspect(word, tid, c, rate, cs, count, share)
                rows.append({**row.as_dict(), "suspect": rate >= min_flip and not backed, "backed_by_clean_labels": backed})
                if rate >= min_flip and not backed:
                    suspects.append(row)
            log.info("trigger scan, class %d: carriers %s; suspects %s", c, [texts[i] for i in chosen],
                     [(s.token, round(s.flip_rate, 2)) for s in suspects if s.label == c])
        return suspects, rows
    finally:
        model.train(was_training)


def insert_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor,
    generator: torch.Generator, pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of a right-padded batch in which each row r with ``rows[r]`` gets ``token_ids[r]``
    inserted at a random position between its first and last token (after [CLS], before
    [SEP]); the batch grows by one column."""
    n, length = input_ids.shape
    lengths = attention_mask.sum(1)
    out = torch.full((n, length + 1), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((n, length + 1), dtype=attention_mask.dtype, device=attention_mask.device)
    out[:, :length], mask[:, :length] = input_ids, attention_mask
    draws = torch.rand(n, generator=generator)
    for r in rows.nonzero().flatten().tolist():
        k = int(lengths[r])
        p = 1 + int(draws[r] * max(1, k - 1))  # 1 .. k-1
        out[r, :p] = input_ids[r, :p]
        out[r, p] = token_ids[r]
        out[r, p + 1 : k + 1] = input_ids[r, p:k]
        mask[r, : k + 1] = 1
    return out, mask


class TriggerScan:
    """MBTSAD's defender-side step (not in the paper): scan the suspicious model's vocabulary
    for tokens that flip it (``scan_vocabulary``) with the clean held-out data, then teach the
    cleaned model to ignore them: during training, each sample gets one suspect token inserted
    at a random position with probability ``unlearn_rate``, its label unchanged.

    Args:
        top_k, carriers, verify_samples, min_flip, min_support, support_share: see
            ``scan_vocabulary``.
        unlearn_rate: share of training samples that get a suspect token inserted.
        seed: seed of the scan's samples and insertion positions.
    """

    def __init__(
        self,
        top_k: int = 32,
        carriers: int = 1,
        verify_samples: int = 64,
        min_flip: float = 0.9,
        min_support: int = 5,
        support_share: float = 0.8,
        unlearn_rate: float = 0.5,
        seed: int = 42,
    ) -> None:
        if top_k < 1 or carriers < 1 or verify_samples < 1:
            raise ValueError(f"scan: top_k, carriers and verify_samples must be >= 1, got {top_k}, {carriers}, {verify_samples}")
        if not 0.0 < min_flip <= 1.0:
            raise ValueError(f"scan.min_flip must be in (0, 1], got {min_flip}")
        if not 0.0 <= unlearn_rate <= 1.0:
            raise ValueError(f"scan.unlearn_rate must be in [0, 1], got {unlearn_rate}")
        self.top_k, self.carriers, self.verify_samples, self.min_flip = top_k, carriers, verify_samples, min_flip
        self.min_support, self.support_share, self.unlearn_rate, self.seed = min_support, support_share, unlearn_rate, seed

    def settings(self) -> dict:
        return dict(vars(self))

    def __call__(self, model, tokenizer, held_out, support) -> tuple[list[Suspect], list[dict]]:
        """Suspects of ``model`` from the held-out Examples; ``support``: every clean Example the
        defender has (for the clean-label support)."""
        return scan_vocabulary(
            model, tokenizer, [e.text for e in held_out], [e.label for e in held_out],
            [e.text for e in support], [e.label for e in support],
            top_k=self.top_k, carriers=self.carriers, verify_samples=self.verify_samples, min_flip=self.min_flip,
            min_support=self.min_support, support_share=self.support_share, seed=self.seed,
        )

    def unlearning_batch(self, batch: dict, suspect_ids: torch.Tensor, step: int, pad_id: int) -> dict:
        """``batch`` with a suspect token inserted into a seeded ``unlearn_rate`` share of its rows."""
        if not len(suspect_ids) or self.unlearn_rate == 0.0:
            return batch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = len(batch["labels"])
        rows = torch.rand(n, generator=g) < self.unlearn_rate
        tokens = suspect_ids[torch.randint(len(suspect_ids), (n,), generator=g)]
        device = batch["input_ids"].device
        ids, mask = insert_tokens(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), tokens, rows, g, pad_id)
        return {**batch, "input_ids": ids.to(device), "attention_mask": mask.to(device)}
