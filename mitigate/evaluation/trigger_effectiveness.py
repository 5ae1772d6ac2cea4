"""E, S, C and the task-agnostic ASR of a list of triggers on a fine-tuned classifier (the POR
paper, Shen et al., CCS 2021, Definitions 4.1-4.2): how well a downloaded encoder's backdoor
survives a user's fine-tune. The metric first, then the callback that runs it after a test."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl

from mitigate.data.triggers import Insertions
from mitigate.inference import classify_texts

log = logging.getLogger(__name__)


def trigger_effectiveness(
    predict: Callable[[list[str]], list[int]], texts: Sequence[str], trigger: str, t_max: int = 20, seed: int = 0,
) -> dict:
    """E, S, C of one trigger on a fine-tuned classifier (the POR paper, Definitions 4.1-4.2).

    F(alpha) is the prediction on "alpha alpha" (the official code's probe). A text x with
    F(x) != F(alpha) gets the trigger inserted once more at each step t = 1..t_max at a seeded
    random word position (incremental: earlier insertions stay); E(x) is the first t at which the
    prediction becomes F(alpha), S(x) = E(x) * len(alpha) / len(x) in characters. Texts that never
    flip are counted in ``never_flipped`` and left out of E and S. C = 1 / (mean E * mean S).
    ``asr@t``: the share of the eligible texts flipped to F(alpha) by t insertions (the
    task-agnostic ASR: against the label the trigger induces)."""
    if t_max < 1:
        raise ValueError(f"t_max must be >= 1, got {t_max}")
    label = int(predict([f"{trigger} {trigger}"])[0])
    base = predict(list(texts))
    eligible = [i for i, p in enumerate(base) if int(p) != label]
    state = {i: Insertions(texts[i], trigger, random.Random(f"{seed}:{trigger}:{i}")) for i in eligible}
    first: dict[int, int] = {}
    active = list(eligible)
    for t in range(1, t_max + 1):
        if not active:
            break
        for i in active:
            state[i].add()
        preds = predict([state[i].text for i in active])
        for i, p in zip(active, preds):
            if int(p) == label:
                first[i] = t
        active = [i for i in active if i not in first]
    n = len(eligible)
    out = {"label": label, "texts": len(texts), "eligible": n,
           "never_flipped": (n - len(first)) / n if n else float("nan")}
    for t in (1, 3, 5):
        out[f"asr@{t}"] = sum(1 for e in first.values() if e <= t) / n if n else float("nan")
    if first:
        es = [first[i] for i in sorted(first)]
        ss = [first[i] * len(trigger) / max(1, len(texts[i])) for i in sorted(first)]
        out["E"], out["S"] = sum(es) / len(es), sum(ss) / len(ss)
        out["C"] = 1.0 / (out["E"] * out["S"])
    else:
        out["E"] = out["S"] = out["C"] = float("nan")
    return out


def summarise_effectiveness(per_trigger: dict[str, dict]) -> dict:
    """The paper's average row (E, S and C each a mean over the triggers that flipped anything;
    C is the mean of the per-trigger C, not 1/(mean E * mean S)), and per label the best
    trigger by asr@1 (NeuBA's report)."""
    ok = [r for r in per_trigger.values() if r["E"] == r["E"]]
    out = {k: (sum(r[k] for r in ok) / len(ok) if ok else float("nan")) for k in ("E", "S", "C")}
    out["never_flipped"] = sum(r["never_flipped"] for r in per_trigger.values()) / max(1, len(per_trigger))
    best: dict[int, tuple[str, float]] = {}
    for trig, r in per_trigger.items():
        if r["eligible"] and (r["label"] not in best or r["asr@1"] > best[r["label"]][1]):
            best[r["label"]] = (trig, r["asr@1"])
    out["best_per_label"] = {lab: {"trigger": t, "asr@1": a} for lab, (t, a) in sorted(best.items())}
    return out


# -- the callback -----------------------------------------------------------------------------
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
        batch_size: texts per forward pass.
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
