"""The weight-space transforms of the MBTSAD paper's Table II baselines as configurable objects
(YAML ``class_path``), each applied once to the suspicious model before its clean fine-tuning
by ``WeightSpaceMitigation``. Settings that must differ between checkpoints (the pruning rate,
rho) are chosen on the clean dev set, never with poisoned data; the choice and every tried
value go to the run's report."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mitigate.guard import collapse_reason, score
from mitigate.mitigations.weight_space import ops as ws

log = logging.getLogger(__name__)


@dataclass
class TransformContext:
    """What a weight transform reads and uses; ``WeightSpaceMitigation`` builds it (and MBTSAD,
    for E-PUR) before training.

    Attributes:
        model: the model to transform, in place (the suspicious one, or a copy under trial).
        reference: the clean pre-trained tensors by parameter name (None when not given).
        suspicious_dev_cacc: the suspicious model's clean-dev score (%, accuracy; macro-F1 on an
            imbalanced task: ``mitigate.guard.score``), measured once.
        dev_report: clean-dev report of a model (``mitigate.inference.clean_report``).
        probe: ``probe(model, epochs)`` fine-tunes a model in place as the run will, and returns it.
        clean_batches: the defender's clean training data in batches (the run's loader order).
        clean_texts: the defender's clean training texts, before any augmentation.
        tokenizer: the run's tokenizer; ``max_length`` its truncation.
        state: the transform's state during the fine-tuning (e.g. pruned units), checkpointed.
    """

    model: nn.Module
    reference: dict[str, torch.Tensor] | None
    suspicious_dev_cacc: float
    dev_report: Callable[[nn.Module], dict]
    probe: Callable[[nn.Module, int], nn.Module]
    clean_batches: Callable[[], list[dict]]
    clean_texts: list[str]
    tokenizer: object
    max_length: int
    state: dict = field(default_factory=dict)


class WeightTransform:
    """A transform of the suspicious model's weights, applied once before its clean fine-tuning.
    ``apply`` returns what it chose (for the report); ``after_step`` runs after every optimizer
    step of the fine-tuning. ``needs_reference``: it reads the clean pre-trained weights."""

    needs_reference = False

    def apply(self, ctx: TransformContext) -> dict:  # pragma: no cover - abstract
        """Transform ``ctx.model`` in place; what was chosen, for the report."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, state: dict) -> None:
        """Called after every optimizer step of the fine-tuning (pruning keeps its mask)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class Reinit(WeightTransform):
    """Re-initialise the last ``layers`` transformer layers (MBTSAD: 1), optionally the pooler
    and the head, then fine-tune. On MiniLM one layer is 1/6 of the depth (1/12 on bert-base).

    Args:
        layers: how many of the last transformer layers are re-initialised.
        pooler: re-initialise the pooler too.
        head: re-initialise the classification head too.
        seed: seed of the new weights.
    """

    def __init__(self, layers: int = 1, pooler: bool = False, head: bool = False, seed: int = 0) -> None:
        self.layers, self.pooler, self.head, self.seed = layers, pooler, head, seed

    def apply(self, ctx: TransformContext) -> dict:
        torch.manual_seed(self.seed)
        names = ws.reinit_last_layers(ctx.model, self.layers, self.pooler, self.head)
        return {"reinit_layers": self.layers, "parameters_reinitialised": len(names)}


class FinePruning(WeightTransform):
    """Fine-pruning (Liu et al. 2018) on BERT's FFN units: units ranked by their activation on
    the defender's clean training data, pruned in steps of ``step`` while the clean-dev accuracy
    stays within ``max_acc_drop`` points of the suspicious model's (or at a fixed
    ``prune_rate``); the mask stays on through the fine-tuning.

    Args:
        prune_layers: ``last`` (Liu et al.: the last layer) or ``all`` (ranked within each layer).
        score: unit activation ``mean`` or ``mean_abs`` over the real tokens.
        step: pruning rate increment of the search.
        max_acc_drop: the search stops before clean-dev accuracy drops more than this (points).
        prune_rate: a fixed rate instead of the search.
        max_rate: the search's largest rate.
    """

    def __init__(self, prune_layers: str = "last", score: str = "mean", step: float = 0.05,
                 max_acc_drop: float = 4.0, prune_rate: float | None = None, max_rate: float = 0.95) -> None:
        if prune_layers not in ("last", "all") or score not in ("mean", "mean_abs"):
            raise ValueError(f"prune_layers must be last|all and score mean|mean_abs, got {prune_layers!r}, {score!r}")
        if not 0 < step < 1 or (prune_rate is not None and not 0 <= prune_rate < 1):
            raise ValueError(f"step must be in (0, 1) and prune_rate in [0, 1), got {step}, {prune_rate}")
        self.prune_layers, self.score, self.step = prune_layers, score, step
        self.max_acc_drop, self.prune_rate, self.max_rate = max_acc_drop, prune_rate, max_rate

    def apply(self, ctx: TransformContext) -> dict:
        scores = ws.ffn_activation_scores(ctx.model, ctx.clean_batches(), self.score)
        base = ctx.suspicious_dev_cacc  # measured once, before any transform
        tried = []
        if self.prune_rate is not None:
            rate = self.prune_rate
        else:
            rate, k = 0.0, 1
            while k * self.step <= self.max_rate + 1e-9:
                r = round(k * self.step, 6)
                trial = copy.deepcopy(ctx.model)
                ws.apply_ffn_mask(trial, ws.pruned_units(scores, r, self.prune_layers))
                cacc = score(ctx.dev_report(trial))
                ok = cacc >= base - self.max_acc_drop
                tried.append({"rate": r, "dev_cacc": cacc, "accepted": ok})
                del trial
                if not ok:
                    break
                rate, k = r, k + 1
        units = ws.pruned_units(scores, rate, self.prune_layers)
        ws.apply_ffn_mask(ctx.model, units)
        ctx.state["pruned_units"] = {str(i): idx for i, idx in units.items()}
        log.info("fine-pruning: rate %.2f of the FFN units of %s layer(s) (dev CACC bound %.2f)", rate, self.prune_layers, base - self.max_acc_drop)
        return {"rate": rate, "units_pruned": sum(len(v) for v in units.values()), "suspicious_dev_cacc": base,
                "min_dev_cacc": base - self.max_acc_drop, "tried": tried}

    def after_step(self, model, state: dict) -> None:
        ws.apply_ffn_mask(model, {int(i): idx for i, idx in state.get("pruned_units", {}).items()})


def choose_on_dev(ctx: TransformContext, candidates: Sequence[float], transform, probe_epochs: int, max_drop: float, what: str) -> tuple[float, list]:
    """Try ``candidates`` in the given order (most aggressive first): each transforms a copy of
    the suspicious model, fine-tunes it ``probe_epochs`` epochs on the clean training data and
    is accepted when its clean-dev accuracy is within ``max_drop`` points of the suspicious
    model's; the first accepted is chosen (the least aggressive if none is)."""
    base = ctx.suspicious_dev_cacc  # measured once, before any transform
    tried = []
    for c in candidates:
        start = time.perf_counter()
        trial = copy.deepcopy(ctx.model)
        transform(trial, c)
        trial = ctx.probe(trial, probe_epochs)
        report = ctx.dev_report(trial)
        ok = collapse_reason(report, 0.95, base - max_drop) is None
        tried.append({what: c, "dev_cacc": report["cacc"], "dev_score": score(report), "accepted": ok, "seconds": round(time.perf_counter() - start, 1)})
        log.info("%s %g: dev CACC %.2f after %d probe epoch(s) -> %s", what, c, report["cacc"], probe_epochs, "accepted" if ok else "refused")
        del trial
        if ok:
            return c, tried
    log.warning("%s: no candidate kept the clean dev accuracy within %.1f points; taking the mildest, %g", what, max_drop, candidates[-1])
    return candidates[-1], tried


class FineMixing(WeightTransform):
    """Fine-mixing (Zhang et al., Findings EMNLP 2022): each shared tensor keeps a fraction
    ``rho`` of its fine-tuned coordinates, the rest return to the pre-trained weights, then clean
    fine-tuning. ``rho: null`` chooses it from ``rho_grid`` (smallest first) on clean dev data:
    the smallest rho whose short probe fine-tune keeps dev CACC within ``max_acc_drop``.

    Args:
        rho: the fraction of fine-tuned coordinates kept (None: chosen from ``rho_grid``).
        rho_grid: candidates, tried smallest (strongest) first.
        select: ``random`` (a seeded choice of coordinates) or ``delta_small_kept`` (keep those
            that moved least).
        probe_epochs: epochs of each candidate's probe fine-tune.
        max_acc_drop: a candidate is accepted when its probe keeps clean-dev accuracy within
            this many points of the suspicious model's.
        seed: seed of the random selection.
    """

    needs_reference = True

    def __init__(self, rho: float | None = None, rho_grid: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                 select: str = "random", probe_epochs: int = 1, max_acc_drop: float = 2.0, seed: int = 0) -> None:
        self.rho, self.rho_grid, self.select = rho, sorted(rho_grid), select
        self.probe_epochs, self.max_acc_drop, self.seed = probe_epochs, max_acc_drop, seed

    def apply(self, ctx: TransformContext) -> dict:
        def mix(model, rho):
            ws.fine_mix(model, ctx.reference, rho, self.seed, self.select)

        tried = []
        rho = self.rho
        if rho is None:
            rho, tried = choose_on_dev(ctx, self.rho_grid, mix, self.probe_epochs, self.max_acc_drop, "rho")
        mix(ctx.model, rho)
        return {"rho": rho, "select": self.select, "tried": tried}


class FinePurifying(WeightTransform):
    """Fine-purifying (Zhang et al., Findings ACL 2023; reconstructed from the abstract): the coordinates whose
    drift from the pre-trained weights is abnormal for their clean-data curvature (r = d^2 /
    diagonal Fisher) are reset, the ``rho`` fraction with the largest r, then clean fine-tuning.
    ``rho: null`` chooses it from ``rho_grid`` (largest first) on clean dev data.

    Args:
        rho: the fraction of coordinates reset (None: chosen from ``rho_grid``).
        rho_grid: candidates, tried largest (strongest) first.
        indicator: ``drift2_over_fisher``, or the ablations ``abs_drift`` and ``random``.
        rank_scope: rank coordinates over all tensors (``global``) or within each (``per_tensor``).
        fisher_batches: clean batches for the diagonal Fisher (None: all).
        probe_epochs: epochs of each candidate's probe fine-tune.
        max_acc_drop: a candidate is accepted when its probe keeps clean-dev accuracy within
            this many points of the suspicious model's.
    """

    needs_reference = True

    def __init__(self, rho: float | None = None, rho_grid: Sequence[float] = (0.5, 0.4, 0.3, 0.2, 0.1, 0.05),
                 indicator: str = "drift2_over_fisher", rank_scope: str = "global", fisher_batches: int | None = None,
                 probe_epochs: int = 1, max_acc_drop: float = 2.0) -> None:
        self.rho, self.rho_grid = rho, sorted(rho_grid, reverse=True)
        self.indicator, self.rank_scope, self.fisher_batches = indicator, rank_scope, fisher_batches
        self.probe_epochs, self.max_acc_drop = probe_epochs, max_acc_drop

    def apply(self, ctx: TransformContext) -> dict:
        start = time.perf_counter()
        batches = ctx.clean_batches()
        if self.fisher_batches is not None:
            batches = batches[: self.fisher_batches]
        fisher = ws.diagonal_fisher(ctx.model, batches, ctx.reference)
        scores = ws.purify_scores(ctx.model, ctx.reference, fisher, self.indicator)
        fisher_s = round(time.perf_counter() - start, 1)

        def purify(model, rho):
            ws.purify(model, ctx.reference, scores, rho, self.rank_scope)

        tried = []
        rho = self.rho
        if rho is None:
            rho, tried = choose_on_dev(ctx, self.rho_grid, purify, self.probe_epochs, self.max_acc_drop, "rho")
        purify(ctx.model, rho)
        return {"rho": rho, "indicator": self.indicator, "rank_scope": self.rank_scope, "fisher_batches": len(batches),
                "fisher_seconds": fisher_s, "tried": tried}


class EPUR(WeightTransform):
    """Embedding Purification (the Fine-mixing paper, Zhang et al., Findings EMNLP 2022; its
    exact form recalled, not checked): the ``top_n`` input-embedding rows whose drift from the
    pre-trained row is largest for their frequency f in the defender's clean data
    (||d|| / log(max(f, min_freq))) are reset; special tokens never. Alone, or after another
    transform (``WeightSpaceMitigation.epur``), or on MBTSAD's teacher and student.

    Args:
        top_n: rows reset.
        min_freq: the frequency floor of the score's log (rare tokens rank by drift alone).
    """

    needs_reference = True

    def __init__(self, top_n: int = 200, min_freq: int = 20) -> None:
        if top_n < 1 or min_freq < 2:
            raise ValueError(f"top_n must be >= 1 and min_freq >= 2, got {top_n}, {min_freq}")
        self.top_n, self.min_freq = top_n, min_freq

    def apply(self, ctx: TransformContext) -> dict:
        """Reset ``ctx.model``'s rows; token frequencies from the defender's clean texts."""
        model = ctx.model
        counts = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.long)
        for ids in ctx.tokenizer(ctx.clean_texts, truncation=True, max_length=ctx.max_length)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids), minlength=len(counts))[: len(counts)]
        rows = ws.epur_rows(model, ctx.reference, counts, self.top_n, self.min_freq, ctx.tokenizer.all_special_ids)
        tokens = ctx.tokenizer.convert_ids_to_tokens(rows[:20])
        log.info("E-PUR: %d rows reset, the first: %s", len(rows), tokens)
        return {"rows_reset": len(rows), "top_20": tokens}
