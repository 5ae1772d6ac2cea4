"""IMBERT: find the tokens the prediction hinges on (gradients or attention), remove them, and
classify again."""

from __future__ import annotations

from typing import Literal

import logging

import torch

from mitigate.callbacks.defenses.base import Defense, gather_cat, gather_objects, progress, special_mask
from mitigate.defenses.imbert import pick_tokens, remove_tokens, topk_precision
from mitigate.defenses.saliency import attention_saliency, gradient_saliency
from mitigate.metrics import CorrectionMetrics

log = logging.getLogger(__name__)


class IMBERT(Defense):
    """IMBERT-G (``saliency="gradient"``: input-embedding gradient norms of the loss against the
    model's own prediction) or IMBERT-A (``saliency="attention"``: attention received in the
    last layer). The top-``k`` sub-tokens by saliency are candidates; one is removed only if its
    saliency is below ``lam`` (IMBERT-G's λ; ``lam: null`` removes all k, the plain form the
    paper gives for IMBERT-A). Removal is ``delete`` (default) or ``mask``. Logs CACC and ASR
    after correction, and top-K precision: the share of the top-k candidates of each poisoned
    sample that are sub-tokens of its inserted trigger (ground truth from the poisoner).

    One forward + one backward pass for the saliency of the whole batch (IMBERT-G; IMBERT-A:
    one forward pass), then one forward pass to re-classify.

    ``max_cacc_drop`` (points, 0-100) replaces the fixed ``lam`` by one picked on the clean
    held-out (dev) set: the largest λ among the quantiles of the dev samples' top-k saliencies
    whose dev accuracy after removal drops by at most that much (binary search, assuming
    accuracy falls as λ grows). The paper's λ = 1 was tuned on bert-base; the gradient norms
    of another encoder live on another scale. Uses clean data only, as a defender would.
    """

    def __init__(
        self,
        saliency: Literal["gradient", "attention"] = "gradient",
        k: int = 3,
        lam: float | None = 1.0,
        operation: Literal["delete", "mask"] = "delete",
        max_cacc_drop: float | None = None,
        target_label: int | None = None,
        name: str | None = None,
        batch_size: int = 64,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
        precision: Literal["full", "bf16", "int8"] = "full",
    ) -> None:
        if saliency not in ("gradient", "attention"):
            raise ValueError(f"saliency must be 'gradient' or 'attention', got {saliency!r}")
        if operation not in ("delete", "mask"):
            raise ValueError(f"operation must be 'delete' or 'mask', got {operation!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if precision == "int8" and saliency == "gradient":
            raise ValueError("IMBERT: precision int8 has no gradients for the gradient saliency; use bf16 or saliency: attention")
        super().__init__(name or f"imbert_{saliency[0]}", batch_size, max_samples, seed, write_csv, precision)
        self.saliency, self.k, self.lam, self.operation = saliency, k, lam, operation
        self.max_cacc_drop, self.target_label = max_cacc_drop, target_label

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return CorrectionMetrics(self._target, extra=("precision", "removed"))

    def extra_results(self) -> dict[str, float]:
        return {"lam": float("nan") if self.lam is None else self.lam}

    def calibrate(self, trainer, pl_module) -> None:
        model = self.model(pl_module)
        if self.saliency == "attention" and model.config._attn_implementation != "eager":
            # fused attention kernels do not return attention probabilities; outputs are the same
            model.set_attn_implementation("eager")
        if self.max_cacc_drop is not None:
            self.lam = self._calibrate_lam(trainer, model, self.tokenizer(trainer))

    def _saliency(self, model, ids, attn):
        score_fn = gradient_saliency if self.saliency == "gradient" else attention_saliency
        return score_fn(model, ids, attn)

    def _calibrate_lam(self, trainer, model, tok) -> float:
        dm = trainer.datamodule
        loader = dm.eval_loader("dev", batch_size=self.batch_size)
        kept = []
        with progress(len(loader), f"{self.name}: saliency on dev", trainer) as bar:
            for b in loader:
                ids, attn = b["input_ids"].to(model.device), b["attention_mask"].to(model.device)
                scores, logits = self._saliency(model, ids, attn)
                cand = attn.bool() & ~special_mask(ids, tok)
                kept.append((ids, attn, scores, cand, b["labels"].to(model.device), logits.argmax(-1)))
                bar.update(1)
        top = torch.cat([
            sc.float().masked_fill(~c, float("-inf")).topk(min(self.k, sc.shape[1]), dim=1).values.flatten()
            for _, _, sc, c, _, _ in kept
        ])
        top = gather_cat(trainer, top[torch.isfinite(top)])
        grid = sorted({float(torch.quantile(top.double(), q)) for q in torch.linspace(0, 1, 41).tolist()})

        def accuracy(lam: float | None) -> float:
            hits = n = 0
            with torch.no_grad():
                for ids, attn, sc, c, labels, before in kept:
                    if lam is None:
                        preds = before
                    else:
                        _, _, rm = pick_tokens(sc, c, self.k, lam)
                        new_ids, new_attn = remove_tokens(ids, attn, rm, self.operation, tok.pad_token_id)
                        preds = model(input_ids=new_ids, attention_mask=new_attn).logits.argmax(-1)
                    hits, n = hits + int((preds == labels).sum()), n + len(labels)
            parts = gather_objects(trainer, (hits, n))
            return 100 * sum(h for h, _ in parts) / max(1, sum(m for _, m in parts))

        base = accuracy(None)
        lo, hi = -1, len(grid)  # grid[lo] passes (lo = -1: no λ tried yet), grid[hi] fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if base - accuracy(grid[mid]) <= self.max_cacc_drop:
                lo = mid
            else:
                hi = mid
        lam = grid[lo] if lo >= 0 else 0.0  # 0: nothing is ever removed
        log.info("%s: λ = %.4g from the dev set (dev CACC %.2f, allowed drop %g points)", self.name, lam, base, self.max_cacc_drop)
        return lam

    def on_test_start(self, trainer, pl_module) -> None:
        self._target = self.target_of(trainer, self.target_label)
        super().on_test_start(trainer, pl_module)

    def defend(self, trainer, pl_module, batch, texts) -> None:
        model, tok = self.model(pl_module), self.tokenizer(trainer)
        for s in range(0, len(texts), self.batch_size):
            part = {k: v[s : s + self.batch_size] for k, v in batch.items()}
            self._defend(model, tok, part, texts[s : s + self.batch_size])

    def _defend(self, model, tok, batch, texts) -> None:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        scores, logits = self._saliency(model, ids, attn)
        candidates = attn.bool() & ~special_mask(ids, tok)
        positions, valid, remove = pick_tokens(scores, candidates, self.k, self.lam)
        new_ids, new_attn = remove_tokens(ids, attn, remove, self.operation, tok.pad_token_id)
        with torch.no_grad():
            preds = model(input_ids=new_ids, attention_mask=new_attn).logits.argmax(-1)
        poisoned = batch["poisoned"].bool()
        self.metric.update(preds, batch["labels"], poisoned)
        trig = batch["trigger_mask"].bool()
        self.metric.rates["precision"].update(topk_precision(positions, valid, trig)[poisoned])
        self.metric.rates["removed"].update(remove.sum(1).float())
        before = logits.argmax(-1)
        for r in range(len(texts)):
            removed = ids[r][remove[r]].tolist()
            picked = positions[r][valid[r]]
            self.rows.append({
                "poisoned": int(poisoned[r]), "index": int(batch["index"][r]), "text": texts[r],
                "label": int(batch["labels"][r]), "pred": int(before[r]), "defended_pred": int(preds[r]),
                "top_k": " ".join(tok.convert_ids_to_tokens(ids[r][picked].tolist())),
                "top_k_scores": " ".join(f"{float(scores[r, p]):.4g}" for p in picked),
                "removed": " ".join(tok.convert_ids_to_tokens(removed)),
            })
