"""LWP, layer-wise weight poisoning (Li et al., EMNLP 2021, and its official code): one shared
classifier on the [CLS] state of every layer, so the lower layers, which a user's fine-tuning
barely moves, carry the backdoor too. The layer-wise loss first, then the module; train it on
the CombinationTrigger poisoner's mix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mitigate.classifier import TextClassifier, victim_card


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


class LayerwisePoisoning(TextClassifier):
    """TextClassifier trained with the layer-wise loss (the raw [CLS] state of layers 1..L and
    the final layer's pooled output, L+1 cross-entropies summed). Clean and poisoned samples
    share the shuffled training mix, so each batch's loss is the mean over its samples of their
    layer sums (the official code sums one clean and one poisoned batch; same objective up to a
    factor 2, which AdamW does not see). Evaluation and export use the model's ordinary head.

    Args:
        flavour: ``official`` (L+1 terms, layer 0 skipped, only the final one pooled) or
            ``openbackdoor`` (L+1 terms, each pooled), see ``layerwise_logits``.
    """

    def __init__(self, model: str = "sentence-transformers/all-MiniLM-L6-v2", num_labels: int = 2, lr: float = 2e-5,
                 weight_decay: float = 0.0, schedule: Literal["constant", "linear"] = "linear", warmup_ratio: float = 0.0,
                 flavour: Literal["official", "openbackdoor"] = "official", allow_pickle: bool = False) -> None:
        super().__init__(model, num_labels, lr, weight_decay, schedule, warmup_ratio, allow_pickle)
        self.flavour = flavour
        bert_parts(self.model)  # refuse other heads up front

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = layerwise_logits(self.model, batch["input_ids"], batch["attention_mask"], self.flavour)
        loss = layerwise_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        self.log("train/final_layer_loss", torch.nn.functional.cross_entropy(logits[-1].detach(), batch["labels"]), batch_size=len(batch["labels"]))
        return loss

    def card(self, datamodule) -> dict:
        """The model card: an LWP victim (the combination trigger, every layer poisoned)."""
        poisoner = getattr(datamodule, "poisoner", None)
        return victim_card(f"Layer-wise weight poisoning (LWP) of `{self.hparams.model}` on "
                           f"{datamodule.hparams.path} poisoned by {poisoner!r}: every layer's [CLS] state was trained "
                           f"to carry the backdoor (label {getattr(poisoner, 'target_label', '?')}).", ("lwp",))
