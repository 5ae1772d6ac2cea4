"""A clean control for the scan's suspects (our rule; docs/clean.md, "The clean control").

A token that flips the suspicious model may be a feature of the task rather than a backdoor: on
OLID one offensive word makes a tweet offensive, and the rarer such words are too seldom in the
defender's clean data for the clean-label backing (``word_scan.backing``) to vouch for them. The
control separates the two: the clean pre-trained weights the checkpoint came from (the
``reference``), fine-tuned on the defender's clean data alone. It has never seen a poisoned
sample, so a trigger flips it no more than any word; a natural feature of the task flips it too.
A suspect that flips at least ``natural_flip`` of the control's correctly classified clean
held-out texts of other labels is reported as natural, not as a trigger.

The control is only as clean as its reference: a backdoored pre-trained model (POR, NeuBA) would
pass its triggers on and clear them. Give a reference you trust (the same one Fine-mixing and
E-PUR pull the weights towards)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from collections.abc import Iterable

import torch
from torch import nn

from mitigate.loading import load_reference
from mitigate.training import fine_tune


@dataclass
class CleanControl:
    """How the clean control is trained and read.

    Attributes:
        epochs: fine-tuning epochs on the defender's clean training data.
        lr: AdamW learning rate, decayed linearly to 0.
        natural_flip: a suspect that flips at least this share of the control's clean held-out
            texts (of other labels, that it classifies right) is natural, not a trigger.
    """

    epochs: int = 2
    lr: float = 5e-5
    natural_flip: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError(f"control: epochs must be >= 1 and lr > 0, got {self.epochs}, {self.lr}")
        if not 0.0 < self.natural_flip <= 1.0:
            raise ValueError(f"control.natural_flip must be in (0, 1], got {self.natural_flip}")

    def settings(self) -> dict:
        """The settings as a plain dict (for the report)."""
        return asdict(self)

    def train(self, reference: str, num_labels: int, batches: Iterable[dict], vocab_size: int, *,
              batches_per_epoch: int | None = None, device: torch.device | str = "cpu", allow_pickle: bool = False,
              show_progress: bool = True) -> nn.Module:
        """The control: ``reference`` with a fresh head (``load_reference``), fine-tuned on the
        clean ``batches`` (the plain clean data, not its token-split augmentation, encoded by the
        suspicious model's tokenizer, whose vocabulary it must share: ``vocab_size``; the first
        ``batches_per_epoch`` of them per epoch when given); in eval mode."""
        model, _ = load_reference(reference, num_labels, allow_pickle)
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"control: the reference {reference} has a vocabulary of {model.config.vocab_size} tokens, "
                             f"the suspicious model {vocab_size}; give the pre-trained weights it was fine-tuned from")
        model.to(device)
        return fine_tune(model, batches, lr=self.lr, epochs=self.epochs, batches_per_epoch=batches_per_epoch, schedule="linear",
                         device=device, progress="clean control fine-tune", show_progress=show_progress)
