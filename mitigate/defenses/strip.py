"""STRIP: many word-replaced copies of each input; a low mean prediction entropy betrays a trigger."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Literal

import torch

from mitigate.defenses.base import device_batch_size, Defense, gather_cat, gather_objects, percentile_threshold, progress, world
from mitigate.inference import classify_encoded, classify_texts, encode_texts, pad_rows, predict_batch
from mitigate.metrics import DetectionMetrics

log = logging.getLogger(__name__)


def perturb(text: str, pool: Sequence[str], ratio: float, copies: int, rng: random.Random) -> list[str]:
    """``copies`` variants of ``text``, each with ``max(1, round(ratio * n))`` of its n words
    (chosen at random) replaced by words drawn from ``pool``."""
    words = text.split()
    if not words or not pool:
        return [text] * copies
    k = min(len(words), max(1, round(ratio * len(words))))
    out = []
    for _ in range(copies):
        w = list(words)
        for i in rng.sample(range(len(words)), k):
            w[i] = rng.choice(pool)
        out.append(" ".join(w))
    return out


#: one word's token ids as a copy's first word, as a later word (after its one space), and its
#: characters
Span = tuple[list[int], list[int], int]

#: one encoded copy: its model input ids (special tokens included, truncated) and the characters
#: of its text (what ``classify_texts`` sorts by)
Row = tuple[list[int], int]


def perturb_spans(spans: Sequence[Span], pool: Sequence[Span], ratio: float, copies: int,
                  rng: random.Random) -> list[tuple[list[int], int]]:
    """``perturb`` on token ids: the same ``copies`` copies of the text whose words are ``spans``
    (``rng`` makes exactly ``perturb``'s draws: ``sample`` of the positions, then one ``choice``
    from ``pool`` per position), each as (content ids: the first word's ids without a leading
    space, the others' with theirs; characters of ``" ".join(words)``). Needs a non-empty text
    and pool (``perturb`` returns the text unchanged otherwise)."""
    n = len(spans)
    k = min(n, max(1, round(ratio * n)))
    base = n - 1 + sum(s[2] for s in spans)
    out = []
    for _ in range(copies):
        w = list(spans)
        chars = base
        for i in rng.sample(range(n), k):
            new = rng.choice(pool)
            chars += new[2] - w[i][2]
            w[i] = new
        out.append((joined_ids(w), chars))
    return out


def joined_ids(spans: Sequence[Span]) -> list[int]:
    """Content ids of the words joined by one space: the first word's ids, then the others' with
    their leading space."""
    ids = list(spans[0][0]) if spans else []
    for s in spans[1:]:
        ids += s[1]
    return ids


class WordIds:
    """STRIP's copies (Gao et al., "STRIP", ACSAC 2019) as model inputs built from token ids:
    each distinct word is tokenised once (without special tokens, as a text's first word and
    after a space), a copy's ids are the concatenation of its words' ids, truncated as the
    tokenizer truncates (``truncation=True, max_length``) and wrapped in its special tokens.
    Exact only where tokenising ``" ".join(words)`` equals that concatenation (WordPiece splits
    at whitespace; byte-level BPE carries the space into the next word's first token): ``check``
    tests it on real texts before the path is used.

    Args:
        tokenizer: the classifier's tokenizer.
        max_length: the sub-token limit of the model inputs, special tokens included.
    """

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.prefix, self.suffix = special_tokens_around(tokenizer)
        self.content = max(0, max_length - len(self.prefix) - len(self.suffix))
        self.left_truncation = getattr(tokenizer, "truncation_side", "right") == "left"
        self.left_padding = getattr(tokenizer, "padding_side", "right") == "left"
        self.pad_id = tokenizer.pad_token_id
        self.spans: dict[str, Span] = {}

    def add(self, words) -> None:
        """Tokenise the words not cached yet, both forms, in one batched call."""
        new = list(dict.fromkeys(w for w in words if w not in self.spans))
        if not new:
            return
        ids = self.tokenizer(new + [" " + w for w in new], add_special_tokens=False)["input_ids"]
        for w, first, rest in zip(new, ids, ids[len(new):]):
            self.spans[w] = (first, rest, len(w))

    def span_list(self, words: Sequence[str]) -> list[Span]:
        """The spans of ``words`` (cached first)."""
        self.add(words)
        return [self.spans[w] for w in words]

    def row(self, content: list[int]) -> list[int]:
        """Model input ids of a copy's content ids: truncated to ``max_length`` with the
        special tokens, on the tokenizer's truncation side, then wrapped in them."""
        if len(content) > self.content:
            content = content[len(content) - self.content:] if self.left_truncation else content[:self.content]
        return self.prefix + content + self.suffix

    def copies(self, text: str, pool: Sequence[Span], ratio: float, copies: int, rng: random.Random) -> list[Row]:
        """``perturb(text, pool words, ratio, copies, rng)``'s copies as rows."""
        words = text.split()
        if not words or not pool:  # perturb leaves the text as it is
            return [(self.encode([text])[0], len(text))] * copies
        return [(self.row(ids), chars) for ids, chars in perturb_spans(self.span_list(words), pool, ratio, copies, rng)]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The tokenizer's own rows of ``texts`` (special tokens, truncation; no padding)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"] if texts else []

    def pad(self, rows: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of rows, padded as the tokenizer pads a batch."""
        return pad_rows(rows, self.pad_id, device, left=self.left_padding)

    def check(self, texts: Sequence[str], batch_size: int) -> str | None:
        """Why this path would not give the tokenizer's inputs for copies of ``texts`` (None:
        it gives them): each text with its words joined by one space (as every copy is), encoded
        by the tokenizer and by this path, compared row by row and as padded batches, at
        ``max_length`` and at a length that truncates them."""
        joined = [" ".join(t.split()) for t in texts]
        joined = [t for t in joined if t]
        if not joined:
            return "no held-out text to check the token ids on"
        short = WordIds(self.tokenizer, len(self.prefix) + len(self.suffix) + 3)
        short.spans = self.spans  # one cache
        for path in (self, short):
            ours = [path.row(joined_ids(path.span_list(t.split()))) for t in joined]
            theirs = path.encode(joined)
            bad = next((t for t, a, b in zip(joined, ours, theirs) if a != b), None)
            if bad is not None:
                return f"its ids of {bad[:60]!r} (max_length {path.max_length}) differ from the tokenizer's"
            for s in range(0, len(joined), batch_size):
                a = path.pad(ours[s:s + batch_size], "cpu")
                b = encode_texts(self.tokenizer, joined[s:s + batch_size], path.max_length, "cpu")
                if not all(torch.equal(x, y) for x, y in zip(a, b)):
                    return f"its padded batches (max_length {path.max_length}) differ from the tokenizer's"
        return None


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after one text's content (BERT:
    [CLS] / [SEP]; RoBERTa: <s> / </s>), read off a probe word encoded with and without them."""
    full = tokenizer("a")["input_ids"]
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    for s in range(len(full) - len(content) + 1):
        if full[s:s + len(content)] == content:
            return full[:s], full[s + len(content):]
    raise ValueError("the tokenizer's special tokens do not surround a text's content")


def copy_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Prediction entropy -sum_i y_i log y_i of each copy: probs (..., classes) -> (...)."""
    p = probs.float()
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def decided(h: torch.Tensor, threshold: float, z: float) -> torch.Tensor:
    """Sequential test of STRIP's decision after k copies: True for the inputs whose mean
    entropy's interval mean +- z * std / sqrt(k) (std over their k copies) lies wholly on one
    side of ``threshold``; those need no more copies. h: (inputs, k)."""
    k = h.shape[1]
    if k < 2:
        return torch.zeros(h.shape[0], dtype=torch.bool)
    m, half = h.mean(1), z * h.std(1) / k**0.5
    return (m + half < threshold) | (m - half > threshold)


def strip_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(x) = (1/N) Σ_n Σ_i −y_i^n log y_i^n for probs of shape (inputs, N copies, classes):
    the entropy of each copy, averaged over the copies of the SAME input (never across
    inputs). Returns (inputs,)."""
    if probs.dim() != 3:
        raise ValueError(f"expected (inputs, copies, classes) probabilities, got shape {tuple(probs.shape)}")
    return copy_entropy(probs).mean(-1)


# -- the callback ------------------------------------------------------------------------------


class STRIP(Defense):
    """STRIP (Gao et al.) for text.

    Each input gets ``copies`` perturbed copies, each with ``ratio`` of its words replaced by
    words drawn from the clean held-out samples (``pool``: ``other_classes``, of the classes
    OTHER than the one the model predicts for the input; ``any``, of every class, as
    OpenBackdoor); H = the entropy of the model's prediction averaged over the copies of that
    input. Threshold: the ``frr``-th percentile of H over the clean held-out samples (themselves
    perturbed the same way, all ``copies``); flagged if H < threshold. FRR, FAR and AUROC
    (score -H) over all test samples. Perturbations are seeded per (seed, set, sample).

    ``early_stop``: at test time an input gets ``min_copies`` copies, then ``step_copies`` more at
    a time, and stops as soon as its mean entropy's interval (``z`` standard errors) lies on
    one side of the threshold (``decided``); H is the mean over the copies used, which are the
    first ones of the exact path's. The mean number of copies used is reported (``copies_used``).

    ``token_ids``: the copies' model inputs are built from token ids (``WordIds``: every distinct
    word tokenised once, a copy is the concatenation of its words' ids) instead of joining and
    re-tokenising each copy's text: the same random draws, the same batches, bit-identical
    inputs, hence the same decisions. Used only where calibration finds the tokenizer's ids of
    the held-out texts equal to this path's (one log line says which path runs and why;
    ``id_path`` in the results: 1 or 0).

    Args:
        copies: perturbed copies per input (the paper: 20).
        ratio: share of an input's words replaced in each copy.
        frr: allowed false-rejection rate in % (the threshold's percentile of the clean scores).
        pool: where replacement words come from: ``other_classes`` (held-out samples of the
            classes other than the input's predicted one) or ``any`` (every class, OpenBackdoor).
        early_stop: stop adding copies to an input once its decision is settled (see above).
        min_copies: copies every input gets before the early stop may decide.
        step_copies: copies added at a time after that.
        z: standard errors the early stop's interval spans.
        batch_size: sequences per forward pass; None: 32 on a CPU, 256 on a GPU (measured:
            STRIP variants run faster at 32 than at 256 on a 2-core CPU).
        token_ids: build the copies' inputs from cached word token ids where calibration
            verifies that they equal the tokenizer's (false: always re-tokenise the copies' text).
    """

    score_column = ("entropy", "mean prediction entropy over the perturbed copies")

    def __init__(
        self,
        copies: int = 20,
        ratio: float = 0.5,
        frr: float = 1.0,
        pool: Literal["other_classes", "any"] = "other_classes",
        early_stop: bool = False,
        min_copies: int = 5,
        step_copies: int = 5,
        z: float = 2.0,
        name: str = "strip",
        batch_size: int | None = None,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
        precision: Literal["full", "bf16", "int8"] = "full",
        calib_samples: int | None = None,
        token_ids: bool = True,
    ) -> None:
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if not 0 < frr < 100:
            raise ValueError(f"frr is a percentage in (0, 100), got {frr}")
        if pool not in ("other_classes", "any"):
            raise ValueError(f"pool must be 'other_classes' or 'any', got {pool!r}")
        if early_stop and not (2 <= min_copies <= copies and step_copies >= 1 and z > 0):
            raise ValueError(f"early_stop needs 2 <= min_copies <= copies, step_copies >= 1, z > 0; got {min_copies}, {step_copies}, {z}")
        super().__init__(name, batch_size, max_samples, seed, write_csv, precision, calib_samples)
        self.copies, self.ratio, self.frr, self.pool = copies, ratio, frr, pool
        self.early_stop, self.min_copies, self.step_copies, self.z = early_stop, min_copies, step_copies, z
        self.token_ids = token_ids
        self.word_ids: WordIds | None = None  # set by calibration where the id path is verified

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return DetectionMetrics()

    def variants(self, texts: list[str], keys: list[str], preds: torch.Tensor) -> list[list[str]]:
        """The ``copies`` perturbed copies of each text, in the seeded order (the early-stopping
        path uses their first ones)."""
        out = []
        for text, key, p in zip(texts, keys, preds.tolist()):
            pool = self.all_words if self.pool == "any" else (self.pools.get(p) or self.all_words)
            out.append(perturb(text, pool, self.ratio, self.copies, random.Random(f"{self.seed}-{key}")))
        return out

    def variant_rows(self, texts: list[str], keys: list[str], preds: torch.Tensor) -> list[list[Row]]:
        """``variants`` as model input rows (``WordIds``): the same copies, the same order."""
        ids = self.word_ids
        ids.add(w for t in texts for w in t.split())  # this batch's new words: one tokenizer call
        out = []
        for text, key, p in zip(texts, keys, preds.tolist()):
            pool = self.all_spans if self.pool == "any" else (self.pool_spans.get(p) or self.all_spans)
            out.append(ids.copies(text, pool, self.ratio, self.copies, random.Random(f"{self.seed}-{key}")))
        return out

    def use_token_ids(self, tok, max_len: int, texts: list[str]) -> str:
        """Set up the id path (``word_ids``) if ``token_ids`` and ``WordIds.check`` on ``texts``
        finds it exact for ``tok``, else the text path; needs ``pools`` and ``all_words``.
        Returns the one line that says which path runs and why."""
        self.word_ids = None
        if not self.token_ids:
            return "copies re-tokenised as text (token_ids: false)"
        try:
            ids = WordIds(tok, max_len)
        except ValueError as e:  # special tokens the id path cannot place
            return f"copies re-tokenised as text: the token id path is not exact for this tokenizer ({e})"
        why = ids.check(texts, self.batch_size or 32)
        if why is not None:
            return f"copies re-tokenised as text: the token id path is not exact for this tokenizer ({why})"
        ids.add(self.all_words)
        self.pool_spans = {c: ids.span_list(words) for c, words in self.pools.items()}
        self.all_spans = ids.span_list(self.all_words)
        self.word_ids = ids
        return f"copies built from token ids (checked equal to the tokenizer's on {len(texts)} held-out texts)"

    def classify(self, model, tok, copies: list, max_len: int) -> torch.Tensor:
        """Class probabilities of copies (texts, or rows on the id path), in the same batches."""
        if self.word_ids is None:
            return classify_texts(model, tok, copies, self.batch_size, max_len)
        if max_len != self.word_ids.max_length:
            raise ValueError(f"{self.name}: the token id path was set up for max_length {self.word_ids.max_length}, not {max_len}")
        device = next(model.parameters()).device
        return classify_encoded(model, [c for _, c in copies], lambda idx: self.word_ids.pad([copies[i][0] for i in idx], device),
                                self.batch_size)

    def entropies(self, model, tok, max_len: int, texts: list[str], keys: list[str], preds=None, bar=None,
                  sequential: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H per text, predicted class per text, copies used per text); ``preds`` when the caller
        has them already; ``sequential``: stop early (needs the threshold)."""
        if preds is None:
            preds = classify_texts(model, tok, texts, self.batch_size, max_len).argmax(-1)
        preds = preds.cpu()
        variants = (self.variants if self.word_ids is None else self.variant_rows)(texts, keys, preds)
        n = len(texts)
        h = torch.full((n, self.copies), float("nan"))
        used = torch.full((n,), self.copies, dtype=torch.long)
        active, k = list(range(n)), 0
        while active and k < self.copies:
            stop = self.copies if not sequential else min(self.copies, max(self.min_copies, k + self.step_copies))
            batch = [v for i in active for v in variants[i][k:stop]]
            probs = self.classify(model, tok, batch, max_len)
            h[active, k:stop] = copy_entropy(probs).view(len(active), stop - k)
            k = stop
            if sequential and k < self.copies:
                done = decided(h[active, :k], self.threshold, self.z)
                for i in [a for a, d in zip(active, done.tolist()) if d]:
                    used[i] = k
                active = [a for a, d in zip(active, done.tolist()) if not d]
        if bar is not None:
            bar.update(n)
        return h.nanmean(1), preds, used

    def calibrate(self, trainer, pl_module) -> None:
        if self.batch_size is None:
            self.batch_size = device_batch_size(pl_module.device)
        held = self.held_out(trainer)
        labels = sorted({ex.label for ex in held})
        words = {c: [w for ex in held if ex.label == c for w in ex.text.split()] for c in labels}
        # replacement words for an input predicted c: words of held-out samples of the other classes
        self.pools = {c: [w for o in labels if o != c for w in words[o]] for c in labels}
        self.all_words = [w for c in labels for w in words[c]]
        n, rank = world(trainer)
        mine = list(range(len(held)))[rank::n]
        mine.sort(key=lambda i: len(held[i].text))  # chunks of similar lengths: little padding
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        log.info("%s: %s", self.name, self.use_token_ids(tok, max_len, [ex.text for ex in held]))
        chunk = max(1, 4 * self.batch_size // self.copies)
        hs = []
        with progress(len(mine), f"{self.name}: calibrating", trainer) as bar:
            for s in range(0, len(mine), chunk):
                idx = mine[s:s + chunk]
                h, _, _ = self.entropies(model, tok, max_len, [held[i].text for i in idx], [f"dev-{i}" for i in idx], bar=bar)
                hs.append(h)
        scores = gather_cat(trainer, torch.cat(hs))
        self.threshold = percentile_threshold(scores, self.frr)
        self.calib_n = len(scores)
        self.used_sum = self.used_n = 0
        self._trainer = trainer
        log.info("%s: threshold H < %.4f (%g%% of %d held-out samples)", self.name, self.threshold, self.frr, len(scores))

    def defend(self, trainer, pl_module, batch, texts) -> None:
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        keys = [f"{'test_poisoned' if p else 'test'}-{int(i)}" for p, i in zip(batch["poisoned"], batch["index"])]
        # the batch is tokenised already: its own forward pass gives the predictions
        h, preds, used = self.entropies(model, tok, max_len, texts, keys, preds=predict_batch(model, batch, self.batch_size),
                                        sequential=self.early_stop)
        self.used_sum += int(used.sum())
        self.used_n += len(used)
        h = h.to(pl_module.device)
        poisoned = batch["poisoned"].bool()
        flagged = h < self.threshold
        self.metric.update(flagged, -h, poisoned)
        for r in range(len(texts)):
            self.rows.append({
                "poisoned": int(poisoned[r]), "index": int(batch["index"][r]), "text": texts[r],
                "label": int(batch["labels"][r]), "pred": int(preds[r]), "entropy": f"{float(h[r]):.9g}",
                "copies": int(used[r]), "flagged": int(flagged[r]),
            })

    def extra_results(self) -> dict[str, float]:
        parts = gather_objects(self._trainer, (self.used_sum, self.used_n))
        used = sum(a for a, _ in parts) / max(1, sum(b for _, b in parts))
        return {"threshold": self.threshold, "calib_samples": float(self.calib_n), "copies_used": used,
                "id_path": float(self.word_ids is not None)}
