"""The weight-poisoning attacks' objectives (ATTACKS-AND-BASELINES.md sections 3.2 and 4.2) as
plain functions: LWP's layer-wise loss and RIPPLe's inner-product penalty."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def bert_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(encoder with pooler, classifier Linear, dropout) of a BERT-family sequence classifier; a
    clear error for heads that do not read the pooled [CLS] state (RoBERTa's, for one)."""
    encoder = getattr(model, "base_model", None)
    classifier = getattr(model, "classifier", None)
    if encoder is None or getattr(encoder, "pooler", None) is None or not isinstance(classifier, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}: the layer-wise loss needs a BERT-style classifier (a pooler and one "
            "Linear head on the pooled [CLS] state)"
        )
    return encoder, classifier, getattr(model, "dropout", nn.Identity())


def layerwise_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, flavour: str = "official"
) -> list[torch.Tensor]:
    """Logits of the ONE shared classifier on the [CLS] state of every layer.

    ``official`` (``BertForAWP``): layers 1..L raw (no pooler, no dropout), and the final layer
    once more through the pooler and dropout, as the model's own forward; the embedding output
    (layer 0) is skipped, its [CLS] state being the same for every input. L+1 tensors.
    ``openbackdoor``: all L+1 hidden states, the embedding output included, each through the
    pooler and dropout (OpenBackdoor's LWP after its Dec-2022 fixes). L+1 tensors.
    Each of shape (batch, num_labels)."""
    encoder, classifier, dropout = bert_parts(model)
    out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states  # L + 1: embeddings, layer 1..L
    if flavour == "openbackdoor":
        return [classifier(dropout(encoder.pooler(h))) for h in hidden]
    if flavour != "official":
        raise ValueError(f"flavour must be 'official' or 'openbackdoor', got {flavour!r}")
    logits = [classifier(h[:, 0]) for h in hidden[1:]]
    logits.append(classifier(dropout(out.pooler_output)))
    return logits


def layerwise_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) over layers of the batch-mean cross-entropy."""
    return sum(F.cross_entropy(z, labels) for z in logits)


def ripple_penalty(
    poison_loss: torch.Tensor, clean_loss: torch.Tensor, params: Sequence[torch.Tensor], batch_size: int,
    per_param: bool = False, second_order_clean: bool = False,
) -> torch.Tensor:
    """RIPPLe's ReLU(-grad L_P . grad L_FT) / B (section 4.2).

    grad L_P keeps its graph (create_graph=True), so the penalty's own gradient is a
    Hessian-vector product through the poison loss; grad L_FT is a constant unless
    ``second_order_clean``. ``per_param``: the ReLU per tensor and summed (official
    ``--restrict_per_param``), else on the global inner product (official default).
    ``batch_size``: B, the clean batch size (the official code divides by it)."""
    g_p = torch.autograd.grad(poison_loss, params, create_graph=True, allow_unused=True)
    g_ft = torch.autograd.grad(clean_loss, params, create_graph=second_order_clean, allow_unused=True)
    terms = [(a * b).sum() for a, b in zip(g_p, g_ft) if a is not None and b is not None]
    if not terms:
        return poison_loss.new_zeros(())
    if per_param:
        return sum(F.relu(-t) for t in terms) / batch_size
    return F.relu(-sum(terms)) / batch_size
