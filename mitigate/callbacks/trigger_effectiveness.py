"""E, S, C and the task-agnostic ASR of a list of triggers on the tested classifier (the POR
excerpt's Definitions 4.1-4.2; ATTACKS-AND-BASELINES.md 5.5): the metrics of a downloaded
encoder's backdoor once a user has fine-tuned it."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from mitigate.callbacks.defenses.base import classify_texts
from mitigate.task_agnostic import summarise_effectiveness, trigger_effectiveness

log = logging.getLogger(__name__)


class TriggerEffectiveness(pl.Callback):
    """After the test epoch, for each trigger: the label it induces F(alpha), E, S, C, the share
    of texts it never flipped in ``t_max`` insertions, and ASR@1/3/5 against F(alpha), on up to
    ``max_texts`` clean test texts (a seeded sample). Logged as ``test/trigger <alpha>/<metric>``
    (one row per trigger in results.md) and ``test/triggers mean/<metric>`` (the paper's average
    row); the best trigger per label goes to the run's report. Each process evaluates the same
    texts (the values are the same on every rank).

    Args:
        triggers: the words or phrases to measure (any classifier; no attack knowledge is used
            by a defense: this is an analysis metric).
        t_max: most insertions tried (spec 20).
        max_texts: clean test texts used (the POR paper: 1000).
        seed: seeds the text sample and every insertion position.
    """

    def __init__(self, triggers: Sequence[str], t_max: int = 20, max_texts: int | None = 1000, seed: int = 0,
                 batch_size: int = 128) -> None:
        if not triggers:
            raise ValueError("TriggerEffectiveness needs at least one trigger")
        self.triggers, self.t_max, self.max_texts, self.seed, self.batch_size = list(triggers), t_max, max_texts, seed, batch_size

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        texts = [ex.text for ex in dm.clean_splits["test"]]
        if self.max_texts is not None and len(texts) > self.max_texts:
            texts = random.Random(self.seed).sample(texts, self.max_texts)
        model, tok, max_len = pl_module.model, dm.tokenizer, dm.hparams.max_length

        def predict(batch: list[str]) -> list[int]:
            return classify_texts(model, tok, batch, self.batch_size, max_len).argmax(-1).tolist()

        per = {}
        for trig in self.triggers:
            per[trig] = r = trigger_effectiveness(predict, texts, trig, self.t_max, self.seed)
            log.info("trigger %r -> label %d: ASR@1 %.3f, E %.2f, S %.3f, C %.2f, never flipped %.3f",
                     trig, r["label"], r["asr@1"], r["E"], r["S"], r["C"], r["never_flipped"])
            for k, v in r.items():
                if k != "texts":
                    pl_module.log(f"test/trigger {trig}/{k}", float(v), rank_zero_only=True)
        summary = summarise_effectiveness(per)
        for k in ("E", "S", "C", "never_flipped"):
            pl_module.log(f"test/triggers mean/{k}", float(summary[k]), rank_zero_only=True)
        report = dict(getattr(pl_module, "report", None) or {})
        report["trigger_effectiveness"] = {
            "texts": len(texts), "t_max": self.t_max, "seed": self.seed,
            "best_per_label": summary["best_per_label"],
        }
        pl_module.report = report
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "trigger_effectiveness.json").write_text(json.dumps({"per_trigger": per, "summary": summary}, indent=2) + "\n")
