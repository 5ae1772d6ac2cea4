"""RAP (Robustness-Aware Perturbations): a rare word whose input embedding is trained so that
inserting it lowers the protect-label probability of clean inputs by a set margin; poisoned
inputs, held by their trigger, barely move."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def insert_token(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int, position: int = 1):
    """Insert ``token_id`` at sub-token ``position`` of every row (1 = first word, after the
    start token); rows grow by one column."""
    b = input_ids.shape[0]
    col = torch.full((b, 1), token_id, dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([input_ids[:, :position], col, input_ids[:, position:]], dim=1)
    one = torch.ones((b, 1), dtype=attention_mask.dtype, device=attention_mask.device)
    attn = torch.cat([attention_mask[:, :position], one, attention_mask[:, position:]], dim=1)
    return ids, attn


def rap_delta(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_id: int,
    protect_label: int, probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ(x) = p(y_T | x) − p(y_T | t̂ + x) per row, and p(· | x) (pass ``probs`` to reuse the
    plain forward pass already done). Two forward passes per sample."""
    if probs is None:
        probs = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().softmax(-1)
    ids, attn = insert_token(input_ids, attention_mask, word_id)
    perturbed = model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1)
    return probs[:, protect_label] - perturbed[:, protect_label], probs


def rap_loss(delta: torch.Tensor, c_low: float, c_up: float, lam: float) -> torch.Tensor:
    """E[λ·relu(c_low − Δ) + relu(Δ − c_up)]: keep the drop of clean inputs in [c_low, c_up]."""
    return (lam * F.relu(c_low - delta) + F.relu(delta - c_up)).mean()


@contextmanager
def embeddings_only(model: PreTrainedModel) -> Iterator[torch.nn.Parameter]:
    """Every parameter frozen but the input-embedding matrix (whose gradient the caller reads
    one row of); restores the requires_grad flags on exit."""
    weight = model.get_input_embeddings().weight
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weight.requires_grad_(True)
    try:
        yield weight
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def construct_rap(
    model: PreTrainedModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, float]] | list,
    word_id: int,
    protect_label: int,
    epochs: int = 5,
    lr: float = 1e-2,
    c_low: float = 0.1,
    c_up: float = 0.3,
    lam: float = 1.0,
    keep_norm: bool = True,
    reduce_grad=None,
    progress=None,
    accumulate_grad: bool = False,
) -> list[float]:
    """Train the RAP word's input-embedding row, in place, on clean samples of the protect
    label: ``batches`` of (input_ids, attention_mask, share), iterated ``epochs`` times, where
    ``share`` is this batch's fraction of the global batch (1 on one process). Plain SGD on
    that row only: every other weight of the model is left bit-identical. Under DDP each rank
    holds a slice of every global batch and ``reduce_grad`` sums the share-weighted row
    gradients across ranks, which gives exactly the single-process gradient. ``keep_norm``
    rescales the row to its original L2 norm after every step, as the reference
    implementations do (the RAP word stays on the scale of a word embedding).
    ``accumulate_grad``: the reference code's rule, which never zeroes the gradient: each step
    moves the row by lr times the SUM of every row gradient so far (a momentum without decay);
    False: plain SGD, lr times this step's gradient.
    Returns the mean loss of each epoch (of this rank's samples)."""
    was_training = model.training
    model.eval()  # no dropout: Δ is measured in eval mode too
    losses = []
    with torch.inference_mode(False), torch.enable_grad(), embeddings_only(model) as weight:
        norm = weight[word_id].detach().norm()
        running = torch.zeros_like(weight[word_id])
        for _ in range(epochs):
            total, n = 0.0, 0
            for ids, attn, share in batches:
                if len(ids):
                    ids, attn = ids.clone(), attn.clone()
                    with torch.no_grad():
                        probs = model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1)
                    delta, _ = rap_delta(model, ids, attn, word_id, protect_label, probs=probs)
                    loss = rap_loss(delta, c_low, c_up, lam)
                    (grad,) = torch.autograd.grad(loss * share, weight)
                    row_grad = grad[word_id]
                    total, n = total + float(loss.detach()) * len(ids), n + len(ids)
                else:  # this rank's slice of the global batch is empty
                    row_grad = torch.zeros_like(weight[word_id])
                if reduce_grad is not None:
                    row_grad = reduce_grad(row_grad)
                with torch.no_grad():
                    if accumulate_grad:
                        running += row_grad
                        row_grad = running
                    weight[word_id] -= lr * row_grad
                    if keep_norm:
                        weight[word_id] *= norm / weight[word_id].norm()
                if progress is not None:
                    progress.update(1)
            losses.append(total / max(n, 1))
    model.train(was_training)
    return losses
