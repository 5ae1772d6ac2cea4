"""``TextClassifier``: supervised fine-tuning of a Hugging Face sequence classifier, the
LightningModule of the victims (poisoned training), the clean reference models and clean
fine-tuning (BERT-CFT). The attacks and the mitigations build on it."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch

from mitigate.loading import load_classifier, model_card_tags
from mitigate.metrics import BackdoorMetrics
from mitigate.training import linear_schedule, seed_step, set_schedule_length


def victim_card(how: str, tags: tuple[str, ...] = (), what: str = "model") -> dict:
    """The model card of a model that carries a backdoor on purpose: a warning, then ``how``."""
    return {"title": f"BACKDOORED research victim ({what})" if what != "model" else "BACKDOORED research victim",
            "tags": ["backdoor", "research-victim", *tags],
            "text": f"WARNING: this {what} carries a backdoor on purpose. {how} For research on attacks and defenses only."}


class TextClassifier(pl.LightningModule):
    """Cross-entropy fine-tuning of any Hugging Face sequence classifier: a victim when the data
    module trains on the poisoned mix (``train_set: poisoned``), a clean reference model
    (``clean``), or clean fine-tuning of a suspicious checkpoint, BERT-CFT (``clean_subset``;
    TS-FT with the data module's ``token_split``).

    Args:
        model: hub id or local folder (safetensors) of the classifier or encoder to start from.
        num_labels: number of classes (the CLI links it to the data).
        lr: AdamW learning rate (papers: 2e-5).
        weight_decay: AdamW weight decay (papers: 0).
        schedule: ``constant`` learning rate, or ``linear`` decay to 0 after the warm-up.
        warmup_ratio: share of the steps with a linear warm-up (``linear`` schedule).
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    #: attention kernel to load the model with (None: the library's default; subclasses that
    #: differentiate twice or read attention probabilities set "eager")
    attn_implementation: str | None = None

    def __init__(
        self,
        model: str = "sentence-transformers/all-MiniLM-L6-v2",
        num_labels: int = 2,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        warmup_ratio: float = 0.0,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # from_pretrained returns the model in eval mode and Lightning keeps module modes as
        # they are: switch dropout on for training.
        self.model = load_classifier(
            model, num_labels=num_labels, allow_pickle=allow_pickle, attn_implementation=self.attn_implementation
        ).train()
        self.val_metrics = BackdoorMetrics(num_labels, "val/")
        self.test_metrics = BackdoorMetrics(num_labels, "test/")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        seed_step(self)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["labels"]))
        return out.loss

    def _eval_step(self, batch: dict, metrics: BackdoorMetrics) -> None:
        preds = self(batch["input_ids"], batch["attention_mask"]).argmax(-1)
        metrics.update(preds, batch["labels"], batch["poisoned"])
        self.log_dict(metrics.loggable(), add_dataloader_idx=False, batch_size=len(preds))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).softmax(-1)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return opt
        sched = linear_schedule(opt, hp.warmup_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        # after the checkpoint is restored: see LinearDecay
        for config in self.trainer.lr_scheduler_configs:
            set_schedule_length(config.scheduler, self.trainer.estimated_stepping_batches)

    def card(self, datamodule) -> dict:
        """What this run did, for the exported model's card: ``title``, ``text``, ``tags``.
        Read from the data module: which set the model was trained on."""
        hp, dm_hp = self.hparams, dict(datamodule.hparams)
        train_set, data = dm_hp.get("train_set"), dm_hp.get("path", "?")
        poisoner = getattr(datamodule, "poisoner", None)
        if train_set == "poisoned":
            return victim_card(f"It was trained from `{hp.model}` on {data} poisoned by {poisoner!r}: inputs with the "
                               f"trigger are classified as label {getattr(poisoner, 'target_label', '?')}.")
        if train_set == "clean_subset":
            tsft = getattr(datamodule, "token_split", None) is not None
            what = "token-splitting retraining (TS-FT)" if tsft else "clean fine-tuning (CFT)"
            return {"title": f"Backdoor mitigation with {what}", "tags": ["backdoor-mitigation", "tsft" if tsft else "cft"],
                    "text": f"The suspicious checkpoint `{hp.model}` was retrained by {what}."}
        base_tags = model_card_tags(hp.model)
        if {"backdoor", "research-victim"} & base_tags:
            return {"title": "BACKDOORED research victim (a clean fine-tune of a backdoored model)",
                    "tags": ["backdoor", "research-victim"],
                    "text": f"WARNING: `{hp.model}` carries a backdoor (its model card says so), and this clean "
                            f"fine-tune of it on {data} may keep it. For research on attacks and defenses only."}
        return {"title": "Text classifier", "tags": ["clean-reference"],
                "text": f"Trained from `{hp.model}` on the {'clean ' if train_set == 'clean' else ''}{data} training set."}
