"""LWP, layer-wise weight poisoning (Li et al., EMNLP 2021; ATTACKS-AND-BASELINES.md section 3):
one shared classifier on the [CLS] state of every layer, so the lower layers, which a user's
fine-tuning barely moves, carry the backdoor too. Train on the CombinationTrigger poisoner's mix."""

from __future__ import annotations

from typing import Literal

import torch

from mitigate.modules.classifier import TextClassifier
from mitigate.poisoning_losses import bert_parts, layerwise_logits, layerwise_loss


class LayerwisePoisoning(TextClassifier):
    """TextClassifier trained with the layer-wise loss (the raw [CLS] state of layers 1..L and
    the final layer's pooled output, L+1 cross-entropies summed). Clean and poisoned samples share the shuffled training
    mix, so each batch's loss is the mean over its samples of their layer sums (the official
    code sums one clean and one poisoned batch; same objective up to a factor 2, which AdamW
    does not see). Evaluation and export use the model's ordinary head.

    ``flavour``: ``official`` (L+1 terms, layer 0 skipped, only the final one pooled) or
    ``openbackdoor`` (L+1 terms, each pooled), see ``layerwise_logits``."""

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
