"""Reading a classifier's decisions without its class prior. A model fine-tuned on an imbalanced
task learns the prior into its logits: on a task with 88% of its texts in class 0, a few rare
words flip most minority texts to class 0 with no backdoor behind it. The scans read decisions
with the log of the clean data's class shares subtracted from the logits (logit adjustment:
Menon et al., "Long-tail learning via logit adjustment", ICLR 2021): a backdoor's trigger
dominates the logits and flips as before, a push towards the majority loses the prior's help.
On balanced data the shift is about zero."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def log_prior(labels: Sequence[int], num_labels: int) -> torch.Tensor:
    """The log class shares of ``labels`` (add-one smoothed, so an absent class stays finite),
    centred to mean zero: the shift logit adjustment subtracts."""
    counts = [1 + sum(1 for y in labels if y == c) for c in range(num_labels)]
    total = sum(counts)
    shift = torch.tensor([math.log(n / total) for n in counts])
    return shift - shift.mean()


@contextmanager
def prior_removed(model: torch.nn.Module, labels: Sequence[int] | None) -> Iterator[list[float]]:
    """Within the block, every forward of ``model`` (a transformers classifier) returns logits
    minus the log class prior of ``labels``; yields the class shares used. ``labels`` None:
    the model's logits unchanged (shares empty)."""
    if labels is None:
        yield []
        return
    n = model.config.num_labels
    shift = log_prior(labels, n)

    def adjust(module, args, output):
        logits = output.logits if hasattr(output, "logits") else output[0]
        adjusted = logits - shift.to(device=logits.device, dtype=logits.dtype)
        if hasattr(output, "logits"):
            output.logits = adjusted
            return output
        return (adjusted, *output[1:])

    handle = model.register_forward_hook(adjust)
    try:
        yield [round(sum(1 for y in labels if y == c) / max(1, len(labels)), 4) for c in range(n)]
    finally:
        handle.remove()
