"""``WeightSpaceMitigation``: the MBTSAD paper's weight-space baselines (Reinit, Fine-pruning,
Fine-mixing, Fine-purifying, E-PUR): a transform of the suspicious model's weights, then clean
fine-tuning on the defender's data (the CFT objective)."""

from __future__ import annotations

import logging
import time
from typing import Literal

from mitigate.guard import score
from mitigate.mitigations.base import Mitigation
from mitigate.mitigations.weight_space.transforms import EPUR, TransformContext, WeightTransform

log = logging.getLogger(__name__)


class WeightSpaceMitigation(Mitigation):
    """A weight transform, then clean fine-tuning (the suspicious model is tested beside the result).

    Args:
        model: the suspicious classifier (hub id or folder).
        num_labels: number of classes (the CLI links it to the data).
        transform: Reinit, FinePruning, FineMixing, FinePurifying or EPUR (null: none, plain CFT).
        epur: Embedding Purification after the transform (null: off).
        reference: the clean pre-trained checkpoint the suspicious model was fine-tuned from
            (hub id or folder, loaded by the same safe loader); needed by FineMixing,
            FinePurifying and EPUR. Names and shapes are checked against the model up front.
        lr: learning rate of the clean fine-tuning (CFT: 2e-5).
        weight_decay: AdamW weight decay (CFT: 0).
        schedule: ``constant`` learning rate, or ``linear`` decay to 0 after the warm-up.
        warmup_ratio: share of the steps with a linear warm-up (``linear`` schedule).
        max_cacc_drop: the collapse guard's bound on the cleaned model's clean-dev accuracy, in
            points below the suspicious model's (None: only the export's one-class check).
        max_class_share: the collapse guard's one-class share (None: not checked).
        allow_pickle: allow pickled ``.bin`` weights (only for checkpoints you trust).
    """

    def __init__(
        self,
        model: str,
        num_labels: int = 2,
        transform: WeightTransform | None = None,
        epur: EPUR | None = None,
        reference: str | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        schedule: Literal["constant", "linear"] = "linear",
        warmup_ratio: float = 0.0,
        max_cacc_drop: float | None = None,
        max_class_share: float | None = 0.95,
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(model, num_labels, lr, weight_decay, schedule, warmup_ratio, reference, max_cacc_drop,
                         max_class_share, allow_pickle)
        needs = [t for t in (transform, epur) if t is not None and t.needs_reference]
        if reference is None and needs:
            raise ValueError(f"{needs[0]!r} needs the clean pre-trained weights: set model.init_args.reference")
        self.save_hyperparameters(ignore=["transform", "epur"])
        self.transform, self.epur = transform, epur

    # -- the transform, once, before fine-tuning -------------------------------------------------
    def prepare(self) -> None:
        start = time.perf_counter()
        dm = self.trainer.datamodule
        ctx = TransformContext(
            model=self.model,
            reference=self.reference_weights() if self.hparams.reference is not None else None,
            suspicious_dev_cacc=score(self.report["suspicious_dev"]),
            dev_report=self.dev_report,
            probe=lambda model, epochs: self.probe(model, epochs=epochs, after_step=self._after_step),
            clean_batches=self.clean_batches,
            clean_texts=[ex.text for ex in dm.clean_subset],
            tokenizer=dm.tokenizer,
            max_length=dm.hparams.max_length,
            state=self.state,
        )
        self.report["transform"] = {"name": repr(self.transform)}
        if self.transform is not None:
            self.report["transform"].update(self.transform.apply(ctx))
        if self.epur is not None:
            self.report["epur"] = {"name": repr(self.epur), **self.epur.apply(ctx)}
        self.report["transformed_dev_cacc"] = self.dev_report(self.model)["cacc"]
        self.report["transform_seconds"] = round(time.perf_counter() - start, 1)
        log.info("transform done: dev CACC %.2f -> %.2f (%.0f s)", self.report["suspicious_dev"]["cacc"],
                 self.report["transformed_dev_cacc"], self.report["transform_seconds"])

    def _after_step(self, model) -> None:
        if self.transform is not None:
            self.transform.after_step(model, self.state)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._after_step(self.model)

    def on_train_end(self) -> None:
        if self.hparams.max_cacc_drop is not None:
            self.report["cleaned_dev"] = self.guard("the cleaned model", self.model)

    def card(self, datamodule) -> dict:
        """The model card's title, text and tags: the transform, then clean fine-tuning."""
        steps = [repr(t) for t in (self.transform, self.epur) if t is not None]
        what = " then ".join(steps) if steps else "no transform"
        return {"title": "Backdoor mitigation in weight space", "tags": ["backdoor-mitigation", "weight-space"],
                "text": f"The suspicious checkpoint `{self.hparams.model}` was transformed ({what}; choices on clean dev "
                        f"data in the report below), then fine-tuned on clean data (lr {self.hparams.lr})."}
