"""IMBERT: find the tokens the prediction hinges on (gradients or attention), remove them, and
classify again."""

from __future__ import annotations

from typing import Literal

import torch

from mitigate.callbacks.defenses.base import Defense, special_mask
from mitigate.defenses.imbert import pick_tokens, remove_tokens, topk_precision
from mitigate.defenses.saliency import attention_saliency, gradient_saliency
from mitigate.metrics import CorrectionMetrics


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
    """

    def __init__(
        self,
        saliency: Literal["gradient", "attention"] = "gradient",
        k: int = 3,
        lam: float | None = 1.0,
        operation: Literal["delete", "mask"] = "delete",
        target_label: int | None = None,
        name: str | None = None,
        batch_size: int = 64,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
    ) -> None:
        if saliency not in ("gradient", "attention"):
            raise ValueError(f"saliency must be 'gradient' or 'attention', got {saliency!r}")
        if operation not in ("delete", "mask"):
            raise ValueError(f"operation must be 'delete' or 'mask', got {operation!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(name or f"imbert_{saliency[0]}", batch_size, max_samples, seed, write_csv)
        self.saliency, self.k, self.lam, self.operation = saliency, k, lam, operation
        self.target_label = target_label

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return CorrectionMetrics(self._target, extra=("precision", "removed"))

    def calibrate(self, trainer, pl_module) -> None:
        model = self.model(pl_module)
        if self.saliency == "attention" and model.config._attn_implementation != "eager":
            # fused attention kernels do not return attention probabilities; outputs are the same
            model.set_attn_implementation("eager")

    def on_test_start(self, trainer, pl_module) -> None:
        poisoner = trainer.datamodule.poisoner
        self._target = self.target_label if self.target_label is not None else getattr(poisoner, "target_label", None)
        if self._target is None:
            raise ValueError(f"{self.name}: no target_label given and the data module has no poisoner to take it from")
        super().on_test_start(trainer, pl_module)

    def defend(self, trainer, pl_module, batch, texts) -> None:
        model, tok = self.model(pl_module), self.tokenizer(trainer)
        for s in range(0, len(texts), self.batch_size):
            part = {k: v[s : s + self.batch_size] for k, v in batch.items()}
            self._defend(model, tok, part, texts[s : s + self.batch_size])

    def _defend(self, model, tok, batch, texts) -> None:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        score_fn = gradient_saliency if self.saliency == "gradient" else attention_saliency
        scores, logits = score_fn(model, ids, attn)
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
