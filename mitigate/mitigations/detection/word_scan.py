"""A defender's scan of the vocabulary for tokens and phrases that flip a classifier: inserted
into clean text, a backdoor trigger turns nearly every input into its target class, whatever
the text says; an ordinary word, even a strong one, turns only some. Uses clean data only.

1. Candidates: every vocabulary token that is a whole word on its own (it tokenises back to
   itself), special tokens aside but the unknown token (what any out-of-vocabulary character,
   a look-alike letter say, becomes).
2. Carrier pass (cheap, all candidates): for each class c, the shortest held-out texts that the
   model gives to another class most confidently are the carriers; each candidate is inserted
   after the first token of each carrier and scored by min over carriers of p(c).
3. Verification (the ``top_k`` best per class): each is inserted at a random word position into
   ``verify_samples`` held-out texts that the model gives, rightly, to another class; its flip
   rate is the share that move to c.
4. Phrases: a sentence trigger's words each flip only part of the inputs. Neutral words (seen in
   clean texts of every label) that flip at least ``seed_flip`` seed a beam search that
   extends them with frequent neutral words, verified the same way.
5. A token or phrase is suspect when it flips at least ``min_flip`` and the clean labels do
   not back that class up: for each of its tokens, the share of the clean texts containing
   it that carry label c, read against c's share of all clean texts (``backing``: the lift
   over the prior), stays below ``support_lift``. A word that is a real feature of the task
   (a profanity in offensive-language data) is backed by the clean labels; a trigger, absent
   from clean data or spread over the labels, is not. Reading the lift rather than a fixed
   share keeps a minority label's real features backed on an imbalanced task.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from mitigate.data.triggers import insert_at_random, insert_ids
from mitigate.inference import classify_texts
from mitigate.run.progress import LogProgress
from mitigate.training import SEED_STRIDE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Suspect:
    """A token, or a phrase of tokens, found to flip the model to ``label``."""

    text: str
    token_ids: tuple[int, ...]
    label: int
    flip_rate: float
    carrier_score: float
    clean_count: int  # clean texts that contain the (first) token
    clean_share: float  # share of those labelled ``label``, smoothed towards the label's prior

    def as_dict(self) -> dict:
        """Plain values, for the report."""
        return {**asdict(self), "token_ids": list(self.token_ids)}


def whole_word_tokens(tokenizer) -> list[int]:
    """Ids of the tokens that are a word on their own: the tokenizer turns their text back into
    exactly that token (WordPiece "##" pieces and BPE continuations do not). The unknown token is
    one of them: every character outside the vocabulary reaches the model as it."""
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - {unk}
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = [tokenizer.decode([i]).strip() for i in ids]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [i for i, t, e in zip(ids, texts, enc)
            if t and e == [i] and (i == unk or not (t.startswith("[") and t.endswith("]")))]


@torch.no_grad()
def carrier_scores(
    model, carriers: Sequence[Sequence[int]], phrases: Sequence[Sequence[int]], label: int, batch_size: int = 1024,
    progress: str | None = None, pad_id: int = 0,
) -> torch.Tensor:
    """min over carriers of p(label | carrier with the phrase inserted after its first token),
    for every phrase (a list of token ids; one token for the vocabulary pass). Carriers are
    token id lists with their special tokens; ``pad_id`` pads phrases of unequal length."""
    device = next(model.parameters()).device
    scores = torch.full((len(phrases),), float("inf"))
    bar = LogProgress(len(carriers) * len(phrases), progress or f"trigger scan, class {label}", enabled=progress is not None)
    for carrier in carriers:
        for s in range(0, len(phrases), batch_size):
            chunk = phrases[s : s + batch_size]
            ids = torch.tensor([list(carrier)] * len(chunk))
            seq, mask = insert_ids(ids, torch.ones_like(ids), chunk, torch.ones(len(chunk), dtype=torch.long), pad_id)
            p = model(input_ids=seq.to(device), attention_mask=mask.to(device)).logits.float().softmax(-1)[:, label].cpu()
            scores[s : s + batch_size] = torch.minimum(scores[s : s + batch_size], p)
            bar.update(len(chunk))
    return scores


def flip_rate(model, tokenizer, texts: Sequence[str], word: str, label: int, seed: int = 0, **kw) -> float:
    """Share of ``texts`` (none predicted ``label``) predicted ``label`` once ``word`` (a word or
    a phrase) is inserted at a random word position of each."""
    rng = random.Random(f"{seed}-{word}")
    probs = classify_texts(model, tokenizer, [insert_at_random(t, word, rng) for t in texts], **kw)
    return float((probs.argmax(-1) == label).float().mean())


def label_counts(tokenizer, texts: Sequence[str], labels: Sequence[int], num_labels: int) -> dict[int, list[int]]:
    """For every token id in the clean texts: how many texts of each label contain it."""
    counts: dict[int, list[int]] = {}
    for ids, y in zip(tokenizer(list(texts), add_special_tokens=False)["input_ids"], labels):
        for i in set(ids):
            counts.setdefault(i, [0] * num_labels)[y] += 1
    return counts


def label_shares(labels: Sequence[int], num_labels: int) -> list[float]:
    """Each label's share of the clean texts (uniform when there are none): the prior that the
    clean-label backing is read against."""
    if not len(labels):
        return [1.0 / num_labels] * num_labels
    return [sum(1 for y in labels if y == c) / len(labels) for c in range(num_labels)]


def smoothed_share(counts: Sequence[int] | None, label: int, shares: Sequence[float]) -> float:
    """Share of the clean texts containing a token that carry ``label``, smoothed towards the
    label's share p of all clean texts with C pseudo-texts: (k + C p) / (n + C). A token absent
    from the clean data gets p; with p = 1 / C this is Laplace's (k + 1) / (n + C)."""
    n_labels = len(shares)
    counts = counts or [0] * n_labels
    return (counts[label] + n_labels * shares[label]) / (sum(counts) + n_labels)


def backing(counts: Sequence[int] | None, label: int, shares: Sequence[float]) -> float:
    """How far the clean texts containing a token lean towards ``label`` beyond its prior: the
    lift (s - p) / (1 - p) of the smoothed share s over the label's share p, 0 for an unseen
    token, n / (n + C) for one seen in n texts all of that label, negative when it leans away.
    Read against the prior, a word that makes 70% of its tweets offensive where 32% of all
    tweets are backs that label as much as a 0.85 share would on a balanced task; on a balanced
    binary task a lift of 0.5 is a smoothed share of 0.75."""
    p = shares[label]
    return (smoothed_share(counts, label, shares) - p) / (1.0 - p) if p < 1.0 else 0.0


def scan_vocabulary(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    support_texts: Sequence[str] = (),
    support_labels: Sequence[int] = (),
    settings: TriggerScan | None = None,
) -> tuple[list[Suspect], list[dict]]:
    """Suspect tokens and phrases of ``model``, found with the clean held-out ``texts`` (their
    labels only keep the scan on texts the model gets right), and every verified candidate as
    rows for a report. ``support_texts``/``support_labels``: all the clean data the defender
    has, for the clean-label backing. ``settings``: a ``TriggerScan`` (its defaults when None).

    Phrases (a sentence trigger's words each flip only part of the inputs) grow from neutral
    words: tokens seen in at least ``min_seen`` clean texts, no label's lift (``backing``) above
    ``neutral_lift``. They are few, so they are scored on ``seed_carriers`` carriers; the
    ``seed_k`` best are verified; each that flips at
    least ``seed_flip`` seeds a beam search that extends it, left or right, by the
    ``pool_size`` most frequent neutral tokens, keeping the ``beam`` best by carrier score, up
    to ``phrase_length`` tokens; each step's best phrases are verified like tokens. A word
    that flips part of the inputs because of its meaning ("cringed") is backed by the clean
    labels or unseen, never evidenced neutral, so it seeds nothing."""
    cfg = settings if settings is not None else TriggerScan()
    was_training = model.training
    model.eval()
    n_labels = model.config.num_labels
    try:
        candidates = whole_word_tokens(tokenizer)
        probs = classify_texts(model, tokenizer, texts, cfg.batch_size)
        preds = probs.argmax(-1)
        lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
        counts = label_counts(tokenizer, support_texts, support_labels, n_labels)
        shares = label_shares(support_labels, n_labels)
        is_word = set(candidates)
        neutral = [i for i, _ in sorted(counts.items(), key=lambda kv: -sum(kv[1]))
                   if i in is_word and sum(counts[i]) >= cfg.min_seen
                   and max(backing(counts[i], y, shares) for y in range(n_labels)) <= cfg.neutral_lift]
        rng = random.Random(f"{cfg.seed}-scan")
        suspects, rows = [], []

        def verify(ids: Sequence[int], c: int, score: float, texts_: list[str]) -> dict:
            text = tokenizer.decode(list(ids)).strip()
            rate = flip_rate(model, tokenizer, texts_, text, c, seed=cfg.seed, batch_size=cfg.batch_size)
            lift = max(backing(counts.get(i), c, shares) for i in ids)
            backed = lift >= cfg.support_lift
            share = max(smoothed_share(counts.get(i), c, shares) for i in ids)
            found = Suspect(text, tuple(ids), c, rate, score, sum(counts.get(ids[0], [])), share)
            row = {**found.as_dict(), "clean_lift": lift, "label_share": shares[c],
                   "suspect": rate >= cfg.min_flip and not backed, "backed_by_clean_labels": backed}
            rows.append(row)
            if row["suspect"]:
                suspects.append(found)
            return row

        for c in range(n_labels):
            others = [i for i in range(len(texts)) if preds[i] != c and preds[i] == labels[i]]
            short = [i for i in others if lengths[i] <= cfg.carrier_max_tokens] or sorted(others, key=lambda i: lengths[i])[:10]
            chosen = sorted(short, key=lambda i: float(probs[i, c]))[:cfg.carriers]
            if not chosen:
                continue
            carrier_ids = [tokenizer(texts[i])["input_ids"] for i in chosen]
            held = [texts[i] for i in rng.sample(others, min(cfg.verify_samples, len(others)))]
            score = carrier_scores(model, carrier_ids, [[i] for i in candidates], c, max(cfg.batch_size, 512),
                                   progress=f"trigger scan, class {c}: vocabulary")
            order = score.argsort(descending=True).tolist()
            top = order[: min(cfg.top_k, len(order))]
            # the neutral words, on more carriers (they are few)
            index = {t: j for j, t in enumerate(candidates)}
            pool_j = [index[t] for t in neutral if t in index] if cfg.phrase_length > 1 else []
            more = sorted(short, key=lambda i: float(probs[i, c]))[:cfg.seed_carriers]
            seed_score = carrier_scores(model, [tokenizer(texts[i])["input_ids"] for i in more], [[candidates[j]] for j in pool_j],
                                        c, max(cfg.batch_size, 512)) if pool_j else torch.empty(0)
            seeds_at = [pool_j[k] for k in seed_score.argsort(descending=True).tolist()[:cfg.seed_k]]
            picked = list(dict.fromkeys(top + seeds_at))
            bar = LogProgress(len(picked), f"trigger scan, class {c}: verifying")
            verified = {}
            for j in picked:
                verified[j] = verify([candidates[j]], c, float(score[j]), held)
                bar.update()
            seeds = sorted((verified[j] for j in seeds_at if cfg.seed_flip <= verified[j]["flip_rate"] < cfg.min_flip),
                           key=lambda r: -r["flip_rate"])[:cfg.beam]
            frontier = [list(r["token_ids"]) for r in seeds]
            pool = neutral[:cfg.pool_size]
            for _ in range(cfg.phrase_length - 1):
                if not frontier or not pool:
                    break
                grown = {tuple(ph + [x]) for ph in frontier for x in pool} | {tuple([x] + ph) for ph in frontier for x in pool}
                grown = [list(g) for g in grown]
                sc = carrier_scores(model, carrier_ids, grown, c, max(cfg.batch_size, 512))
                best = sc.topk(min(cfg.beam, len(grown)))
                frontier = [grown[j] for j in best.indices.tolist()]
                hits = [verify(ph, c, v, held) for ph, v in zip(frontier, best.values.tolist())]
                if any(h["suspect"] for h in hits):
                    break
            log.info("trigger scan, class %d: carriers %s; suspects %s", c, [texts[i] for i in chosen],
                     [(s.text, round(s.flip_rate, 2)) for s in suspects if s.label == c])
        return suspects, rows
    finally:
        model.train(was_training)


@dataclass
class TriggerScan:
    """The trigger scan's settings, and the scan itself (MBTSAD's defender-side step, not in the
    paper): scan the suspicious model's vocabulary for tokens and phrases that flip it
    (``scan_vocabulary``) with the clean held-out data, then teach the cleaned model to ignore
    them: during training, each sample gets one suspect inserted at a random position with
    probability ``unlearn_rate``, its label unchanged. In a recipe: ``scan: {top_k: 32, ...}``
    (``scan: null`` turns it off).

    Attributes:
        top_k: best tokens of the carrier pass verified per class.
        carriers: held-out texts each candidate token is inserted into for the carrier pass.
        carrier_max_tokens: carriers are held-out texts of at most this many sub-tokens.
        verify_samples: held-out texts a candidate is inserted into to measure its flip rate.
        min_flip: flip rate from which a candidate is a suspect.
        support_lift: a candidate whose tokens' clean texts lean towards its label at least this
            far beyond the label's prior (``backing``) is backed by the clean labels (a real
            feature), never a suspect. 0.5: a smoothed share of 0.75 on a balanced binary task.
        seed_k: neutral words verified as seeds of the phrase search, per class.
        seed_carriers: carriers the neutral words are scored on.
        seed_flip: flip rate from which a neutral word seeds the phrase search.
        min_seen: a neutral word appears in at least this many clean texts.
        neutral_lift: no label's lift (``backing``) on a neutral word's clean texts exceeds this
            (0.2: a smoothed share of 0.6 on a balanced binary task).
        phrase_length: longest phrase searched (1: single tokens only).
        pool_size: the most frequent neutral words that extend a phrase.
        beam: phrases kept per step of the search.
        batch_size: texts per forward pass of the verification.
        unlearn_rate: share of training samples that get a suspect inserted.
        unlearn_neighbours: unlearn each found one-token trigger's this many nearest tokens in
            the model's input embeddings too (``neighbours.embedding_neighbours``; 0: none).
        seed: seed of the scan's samples and insertion positions.
    """

    top_k: int = 32
    carriers: int = 1
    carrier_max_tokens: int = 10
    verify_samples: int = 48
    min_flip: float = 0.9
    support_lift: float = 0.5
    seed_k: int = 16
    seed_carriers: int = 4
    seed_flip: float = 0.3
    min_seen: int = 3
    neutral_lift: float = 0.2
    phrase_length: int = 1
    pool_size: int = 200
    beam: int = 4
    batch_size: int = 128
    unlearn_rate: float = 0.5
    unlearn_neighbours: int = 0
    seed: int = 42

    def __post_init__(self) -> None:
        if min(self.top_k, self.carriers, self.verify_samples, self.phrase_length, self.beam, self.batch_size) < 1 or self.pool_size < 0:
            raise ValueError("scan: top_k, carriers, verify_samples, phrase_length, beam and batch_size must be >= 1, pool_size >= 0")
        if not 0.0 < self.min_flip <= 1.0 or not 0.0 <= self.seed_flip <= self.min_flip:
            raise ValueError(f"scan: need 0 <= seed_flip <= min_flip <= 1 and min_flip > 0, got {self.seed_flip}, {self.min_flip}")
        if not 0.0 < self.support_lift <= 1.0 or not -1.0 <= self.neutral_lift <= 1.0:
            raise ValueError(f"scan: support_lift must be in (0, 1] and neutral_lift in [-1, 1], got {self.support_lift}, {self.neutral_lift}")
        if not 0.0 <= self.unlearn_rate <= 1.0:
            raise ValueError(f"scan.unlearn_rate must be in [0, 1], got {self.unlearn_rate}")
        if self.unlearn_neighbours < 0:
            raise ValueError(f"scan.unlearn_neighbours must be >= 0, got {self.unlearn_neighbours}")

    def settings(self) -> dict:
        """The settings as a plain dict (for the report)."""
        return asdict(self)

    def __call__(self, model, tokenizer, held_out, support) -> tuple[list[Suspect], list[dict]]:
        """Suspects of ``model`` from the held-out Examples; ``support``: every clean Example the
        defender has (for the clean-label backing)."""
        return scan_vocabulary(
            model, tokenizer, [e.text for e in held_out], [e.label for e in held_out],
            [e.text for e in support], [e.label for e in support], settings=self,
        )

    def unlearning_batch(self, batch: dict, suspects: Sequence[Sequence[int]], step: int, pad_id: int,
                         rank: int = 0, world: int = 1) -> tuple[dict, torch.Tensor]:
        """``batch`` with a suspect (token ids) inserted into a seeded ``unlearn_rate`` share of its
        rows, and which rows (a bool tensor). Under DDP (``world`` processes, this one ``rank``)
        the draws are those of the global batch of one process, whose rows ``rank``,
        ``rank + world``, ... this process holds: N processes insert what one process would."""
        n = len(batch["labels"])
        device = batch["input_ids"].device
        if not suspects or self.unlearn_rate == 0.0:
            return batch, torch.zeros(n, dtype=torch.bool, device=device)
        g = torch.Generator().manual_seed(self.seed * SEED_STRIDE + step)
        total = n * world
        rows = (torch.rand(total, generator=g) < self.unlearn_rate)[rank::world]
        picks = torch.randint(len(suspects), (total,), generator=g)[rank::world].tolist()
        draws = torch.rand(total, generator=g)[rank::world]
        phrases = [list(suspects[k]) if r else None for r, k in zip(rows.tolist(), picks)]
        mask = batch["attention_mask"].cpu()
        positions = 1 + (draws * (mask.sum(1) - 1).clamp(min=1).to(draws.dtype)).long()  # after [CLS], before [SEP]
        ids, mask = insert_ids(batch["input_ids"].cpu(), mask, phrases, positions, pad_id)
        return {**batch, "input_ids": ids.to(device), "attention_mask": mask.to(device)}, rows.to(device)
