"""IMBERT: find the tokens the prediction hinges on (gradients or attention), remove them, and
classify again."""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from mitigate.defenses.base import Defense, gather_cat, gather_objects, progress
from mitigate.inference import special_mask
from mitigate.metrics import CorrectionMetrics

log = logging.getLogger(__name__)


def pick_tokens(
    scores: torch.Tensor, candidates: torch.Tensor, k: int, lam: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` candidate positions by score, and which of them to remove.

    ``candidates`` (B, L) bool marks real, non-special sub-tokens. A picked position is removed
    only if its score is below ``lam`` (IMBERT's threshold: confident poisoned inputs have
    small gradients); ``lam=None`` removes all top-k. Returns (picked positions (B, k'),
    picked valid (B, k') — False where a row has fewer than k candidates, remove mask (B, L)).
    """
    k = min(k, scores.shape[1])
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    values, positions = masked.topk(k, dim=1)
    valid = torch.isfinite(values)
    remove = valid if lam is None else valid & (values < lam)
    mask = torch.zeros_like(candidates).scatter(1, positions, remove)
    return positions, valid, mask


def remove_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    remove: torch.Tensor,
    operation: Literal["delete", "mask"],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``delete``: drop the sub-tokens from the sequence (the rest shifts left, rows are
    re-padded); ``mask``: keep them but set their attention mask to 0."""
    attention_mask = attention_mask.bool()
    if operation == "mask":
        return input_ids, (attention_mask & ~remove).long()
    if operation != "delete":
        raise ValueError(f"operation must be 'delete' or 'mask', got {operation!r}")
    keep = attention_mask & ~remove
    # stable sort puts kept tokens first, in their order
    order = torch.sort((~keep).int(), dim=1, stable=True).indices
    ids = input_ids.gather(1, order)
    new_mask = keep.gather(1, order)
    ids = ids.masked_fill(~new_mask, pad_token_id)
    width = max(1, int(new_mask.sum(1).max()))
    return ids[:, :width], new_mask[:, :width].long()


def topk_precision(positions: torch.Tensor, valid: torch.Tensor, trigger_mask: torch.Tensor) -> torch.Tensor:
    """Per sample: |I_K ∩ Ĩ| / |I_K|, the share of the picked positions that are trigger
    sub-tokens (rows with no valid pick give 0)."""
    hits = trigger_mask.gather(1, positions) & valid
    return hits.sum(1).float() / valid.sum(1).clamp(min=1).float()


def gradient_saliency(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g[b, i] = ||dL_b / de_{b,i}||_2`` with ``L_b`` the cross-entropy of sample b against the
    model's own prediction and ``e_{b,i}`` the input (word) embedding of its sub-token i.

    One backward pass serves the whole batch: in eval mode samples do not interact, so the
    gradient of the SUM of per-sample losses w.r.t. sample b's embeddings is sample b's own.
    Returns (saliency (B, L), logits (B, C)). Works inside ``torch.inference_mode`` (Lightning's
    test loop) by leaving it for the duration.
    """
    with torch.inference_mode(False), torch.enable_grad():
        ids, attn = input_ids.clone(), attention_mask.clone()  # normal tensors, not inference ones
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=attn).logits
        loss = F.cross_entropy(logits.float(), logits.argmax(-1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, embeds)
    return grad.float().norm(dim=-1).detach(), logits.detach()


@torch.no_grad()
def attention_saliency(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s[b, i] = 1/(H n) sum_h sum_j A_h[j, i]``: the attention token i RECEIVES in the last
    layer, averaged over heads and the n real tokens attending to it (padding rows excluded;
    the row-sum form printed in the paper is 1 for every softmax row). The model must run
    eager attention (``attn_implementation="eager"``) to return attention probabilities.
    Returns (saliency (B, L), logits (B, C))."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    if not out.attentions or out.attentions[-1] is None:
        raise RuntimeError("the model returned no attentions: load it with attn_implementation='eager'")
    att = out.attentions[-1].float()  # (B, H, L_query, L_key)
    rows = attention_mask[:, None, :, None].to(att.dtype)
    n = attention_mask.sum(-1).clamp(min=1).to(att.dtype)
    s = (att * rows).sum(dim=(1, 2)) / (att.shape[1] * n[:, None])
    return s * attention_mask, out.logits


# -- the callback ------------------------------------------------------------------------------


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

    Args:
        saliency: ``gradient`` (IMBERT-G) or ``attention`` (IMBERT-A).
        k: candidates per input (the top-k sub-tokens by saliency).
        lam: a candidate is removed only when its saliency is below this (None: all k are).
        operation: ``delete`` the removed sub-tokens, or ``mask`` them (attention mask 0).
        max_cacc_drop: pick ``lam`` on the clean dev set instead (points of accuracy allowed to go).
    """

    def __init__(
        self,
        saliency: Literal["gradient", "attention"] = "gradient",
        k: int = 3,
        lam: float | None = 1.0,
        operation: Literal["delete", "mask"] = "delete",
        max_cacc_drop: float | None = None,
        name: str | None = None,
        batch_size: int = 64,
        max_samples: int | None = None,
        seed: int = 42,
        write_csv: bool = True,
        precision: Literal["full", "bf16", "int8"] = "full",
        calib_samples: int | None = None,
    ) -> None:
        if saliency not in ("gradient", "attention"):
            raise ValueError(f"saliency must be 'gradient' or 'attention', got {saliency!r}")
        if operation not in ("delete", "mask"):
            raise ValueError(f"operation must be 'delete' or 'mask', got {operation!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if precision == "int8" and saliency == "gradient":
            raise ValueError("IMBERT: precision int8 has no gradients for the gradient saliency; use bf16 or saliency: attention")
        super().__init__(name or f"imbert_{saliency[0]}", batch_size, max_samples, seed, write_csv, precision, calib_samples)
        self.saliency, self.k, self.lam, self.operation = saliency, k, lam, operation
        self.max_cacc_drop = max_cacc_drop

    def metrics(self, num_classes: int) -> torch.nn.Module:
        return CorrectionMetrics(extra=("precision", "removed"))

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
        subset = self.held_out_indices(trainer) if self.calib_samples is not None else None
        loader = dm.eval_loader("dev", batch_size=self.batch_size, indices=subset)
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
