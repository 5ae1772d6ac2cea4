"""STRIP: many word-replaced copies of each input; a low mean prediction entropy betrays a trigger."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Literal

import torch

from mitigate.defenses.base import device_batch_size, Defense, gather_cat, gather_objects, percentile_threshold, progress, world
from mitigate.inference import classify_texts, predict_batch
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

    def entropies(self, model, tok, max_len: int, texts: list[str], keys: list[str], preds=None, bar=None,
                  sequential: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H per text, predicted class per text, copies used per text); ``preds`` when the caller
        has them already; ``sequential``: stop early (needs the threshold)."""
        if preds is None:
            preds = classify_texts(model, tok, texts, self.batch_size, max_len).argmax(-1)
        preds = preds.cpu()
        variants = self.variants(texts, keys, preds)
        n = len(texts)
        h = torch.full((n, self.copies), float("nan"))
        used = torch.full((n,), self.copies, dtype=torch.long)
        active, k = list(range(n)), 0
        while active and k < self.copies:
            stop = self.copies if not sequential else min(self.copies, max(self.min_copies, k + self.step_copies))
            batch = [v for i in active for v in variants[i][k:stop]]
            probs = classify_texts(model, tok, batch, self.batch_size, max_len)
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
        chunk = max(1, 4 * self.batch_size // self.copies)
        hs = []
        with progress(len(mine), f"{self.name}: calibrating", trainer) as bar:
            for s in range(0, len(mine), chunk):
                idx = mine[s : s + chunk]
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
        return {"threshold": self.threshold, "calib_samples": float(self.calib_n), "copies_used": used}
