"""What every training loop of the toolkit shares: dropout masks as a function of the step (so a
resumed run equals an uninterrupted one), the linear-decay schedule, and the one short
fine-tuning loop that judges a candidate setting on clean data (the probes of MBTSAD's rate
choice and of the weight-space mitigations' rho)."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable

import lightning.pytorch as pl
import torch
from torch import nn

from mitigate.run.progress import LogProgress

#: a prime that spreads seeds derived from (seed, step) apart
SEED_STRIDE = 1_000_003


def seed_step(module: pl.LightningModule) -> None:
    """Dropout masks as a function of (seed, step, rank): a run resumed mid-epoch draws the
    same masks as an uninterrupted one."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    torch.manual_seed((seed * SEED_STRIDE + module.global_step) * 64 + module.global_rank)


class LinearDecay:
    """Learning-rate factor at optimizer step ``step``: linear warm-up over the first
    ``ceil(warmup_ratio * total)`` steps, then linear decay to 0 at step ``total``.

    ``total`` is set when training starts (``on_train_start``), not in ``configure_optimizers``:
    reading ``trainer.estimated_stepping_batches`` there sets the train loader up before a
    checkpoint is restored, and Lightning then never gives the loader its saved position
    (Lightning issue #20550): a run resumed mid-epoch would train the epoch's first batches
    twice and never see its last ones. The factor of step 0 does not depend on ``total``
    (1 without warm-up, 0 with), so the scheduler can be built before ``total`` is known.
    Plain attributes only: LambdaLR saves them in the checkpoint."""

    def __init__(self, warmup_ratio: float = 0.0) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.warmup_ratio = warmup_ratio
        self.total: int | None = None

    def __call__(self, step: int) -> float:
        if self.total is None:
            if step > 0:
                raise RuntimeError("LinearDecay: the schedule's length was never set (set .total in on_train_start)")
            return 0.0 if self.warmup_ratio > 0 else 1.0
        total = max(1, self.total)
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with ``LinearDecay``; its length is set with ``set_schedule_length``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LinearDecay(warmup_ratio))


def set_schedule_length(scheduler, total_steps: int) -> None:
    """Give a ``linear_schedule`` its number of steps (no-op for other schedulers)."""
    for fn in getattr(scheduler, "lr_lambdas", []):
        if isinstance(fn, LinearDecay):
            fn.total = int(total_steps)


def fine_tune(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    lr: float,
    weight_decay: float = 0.0,
    epochs: int = 1,
    max_steps: int | None = None,
    batches_per_epoch: int | None = None,
    schedule: str = "constant",
    warmup_ratio: float = 0.0,
    seed: int = SEED_STRIDE,
    prepare: Callable[[dict, int], dict] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    device: torch.device | str = "cpu",
    progress: str = "probe fine-tune",
    show_progress: bool = True,
) -> nn.Module:
    """Cross-entropy fine-tuning of ``model`` in place, outside the trainer: the short runs that
    judge a candidate setting on clean data before the real training starts.

    ``batches`` is iterated once per epoch (a data loader: the same order every epoch), its
    first ``batches_per_epoch`` batches only when given (the trainer's ``limit_train_batches``),
    for ``epochs`` epochs or ``max_steps`` optimizer steps in all, whichever comes first. AdamW at
    ``lr``; ``schedule`` ``linear`` decays it to 0 over the run's steps after ``warmup_ratio``
    warm-up (as ``LinearDecay``), ``constant`` keeps it. Dropout masks are seeded by
    ``seed + step``. ``prepare(batch, step)`` may rewrite each batch (already on ``device``)
    before its step; ``after_step(model)`` runs after each optimizer step (e.g. to keep pruned
    units at zero). Returns the model in eval mode."""
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = len(batches) if hasattr(batches, "__len__") else None
    if batches_per_epoch is not None:
        per_epoch = batches_per_epoch if per_epoch is None else min(per_epoch, batches_per_epoch)
    total = epochs * per_epoch if per_epoch is not None else max_steps
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    sched = None
    if schedule == "linear":
        sched = linear_schedule(opt, warmup_ratio)
        set_schedule_length(sched, total)
    elif schedule != "constant":
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    bar = LogProgress(total or 0, progress, enabled=show_progress)
    step = 0
    for _ in range(epochs):
        take = per_epoch if max_steps is None or per_epoch is None else min(per_epoch, max(0, max_steps - step))
        for batch in batches if take is None else itertools.islice(batches, take):
            torch.manual_seed(seed + step)
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if prepare is not None:
                batch = prepare(batch, step)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if after_step is not None:
                after_step(model)
            step += 1
            bar.update()
    bar.close()
    return model.eval()
