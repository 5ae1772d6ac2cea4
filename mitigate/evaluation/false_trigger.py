"""The false-trigger rate of a combinatorial trigger (LWP): how often ONE piece alone flips a
non-target test sample to the target label. Logged as ``test/false_trigger_rate`` beside ASR."""

from __future__ import annotations

import lightning.pytorch as pl

from mitigate.data.encoding import EncodedDataset
from mitigate.inference import clean_report


class FalseTriggerRate(pl.Callback):
    """After the test epoch, every non-target test sample with a single piece (the poisoner's
    ``false_trigger_eval``) is classified; the share predicted as the target is logged. Each
    process evaluates the whole set (the value is the same on every rank)."""

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        poisoner = getattr(dm, "poisoner", None)
        if poisoner is None or not hasattr(poisoner, "false_trigger_eval"):
            raise ValueError(f"FalseTriggerRate needs a poisoner with single-piece triggers (CombinationTrigger), got {poisoner!r}")
        examples = poisoner.false_trigger_eval(dm.clean_splits["test"], "test")
        ds = EncodedDataset(examples, dm.tokenizer, dm.hparams.max_length)
        report = clean_report(pl_module.model, ds, dm.tokenizer.pad_token_id, dm.hparams.eval_batch_size)
        pl_module.log("test/false_trigger_rate", report["cacc"] / 100.0, rank_zero_only=True)
