"""IMBERT's token selection and removal (Algorithm 1 of the IMBERT paper), batched."""

from __future__ import annotations

from typing import Literal

import torch


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
