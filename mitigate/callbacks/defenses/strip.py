"""STRIP: many word-replaced copies of each input; a low mean prediction entropy betrays a trigger."""

from __future__ import annotations

import logging
import random

import torch

from mitigate.callbacks.defenses.base import Defense, classify_texts, gather_cat, percentile_threshold, predict_batch, progress, world
from mitigate.defenses.strip import perturb, strip_entropy
from mitigate.metrics import DetectionMetrics

log = logging.getLogger(__name__)


class STRIP(Defense):
    """STRIP (Gao et al.) for text.

    Each input gets ``copies`` perturbed copies, each with ``ratio`` of its words replaced by
    words drawn from clean held-out samples of the classes OTHER than the one the model
    predicts for the input; H = the entropy of the model's prediction averaged over the copies
    of that input. Threshold: the ``frr``-th percentile of H over the clean held-out samples
    (themselves perturbed the same way); flagged if H < threshold. FRR, FAR and AUROC (score −H)
    over all test samples. ``copies`` + 1 forward passes per sample, batched ``batch_size``
    sequences at a time. Perturbations are seeded per (seed, set, sample).
    """

    score_column = ("entropy", "mean prediction entropy over the perturbed copies")

    def __init__(
        self,
        copies: int = 20,
        ratio: float = 0.5,
        frr: float = 1.0,
        name: str = "strip",
        batch_size: int = 256,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
    ) -> None:
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if not 0 < frr < 100:
            raise ValueError(f"frr is a percentage in (0, 100), got {frr}")
        super().__init__(name, batch_size, max_samples, seed, write_csv)
        self.copies, self.ratio, self.frr = copies, ratio, frr

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return DetectionMetrics()

    def entropies(self, model, tok, max_len: int, texts: list[str], keys: list[str], preds=None, bar=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(H per text, predicted class per text); ``preds`` when the caller has them already."""
        if preds is None:
            preds = classify_texts(model, tok, texts, self.batch_size, max_len).argmax(-1)
        preds = preds.cpu()
        variants = []
        for text, key, p in zip(texts, keys, preds.tolist()):
            pool = self.pools.get(p) or self.all_words
            variants += perturb(text, pool, self.ratio, self.copies, random.Random(f"{self.seed}-{key}"))
        probs = classify_texts(model, tok, variants, self.batch_size, max_len)
        if bar is not None:
            bar.update(len(texts))
        return strip_entropy(probs.view(len(texts), self.copies, -1)), preds

    def calibrate(self, trainer, pl_module) -> None:
        held = self.held_out(trainer)
        labels = sorted({ex.label for ex in held})
        words = {c: [w for ex in held if ex.label == c for w in ex.text.split()] for c in labels}
        # replacement words for an input predicted c: words of held-out samples of the other classes
        self.pools = {c: [w for o in labels if o != c for w in words[o]] for c in labels}
        self.all_words = [w for c in labels for w in words[c]]
        n, rank = world(trainer)
        mine = list(range(len(held)))[rank::n]
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        hs = []
        with progress(len(mine), f"{self.name}: calibrating", trainer) as bar:
            for s in range(0, len(mine), max(1, self.batch_size // self.copies)):
                idx = mine[s : s + max(1, self.batch_size // self.copies)]
                h, _ = self.entropies(model, tok, max_len, [held[i].text for i in idx], [f"dev-{i}" for i in idx], bar=bar)
                hs.append(h)
        scores = gather_cat(trainer, torch.cat(hs))
        self.threshold = percentile_threshold(scores, self.frr)
        self.calib_n = len(scores)
        log.info("%s: threshold H < %.4f (%g%% of %d held-out samples)", self.name, self.threshold, self.frr, len(scores))

    def defend(self, trainer, pl_module, batch, texts) -> None:
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        keys = [f"{'test_poisoned' if p else 'test'}-{int(i)}" for p, i in zip(batch["poisoned"], batch["index"])]
        # the batch is tokenised already: its own forward pass gives the predictions
        h, preds = self.entropies(model, tok, max_len, texts, keys, preds=predict_batch(model, batch, self.batch_size))
        h = h.to(pl_module.device)
        poisoned = batch["poisoned"].bool()
        flagged = h < self.threshold
        self.metric.update(flagged, -h, poisoned)
        for r in range(len(texts)):
            self.rows.append({
                "poisoned": int(poisoned[r]), "index": int(batch["index"][r]), "text": texts[r],
                "label": int(batch["labels"][r]), "pred": int(preds[r]), "entropy": f"{float(h[r]):.9g}",
                "flagged": int(flagged[r]),
            })

    def extra_results(self) -> dict[str, float]:
        return {"threshold": self.threshold, "calib_samples": float(self.calib_n)}
