"""The MBTSAD distillation losses (the MBTSAD paper, section III-B2: attention transfer with
Attention Enhancement, hidden states, classification), as plain functions and one nn.Module.
Shapes: attentions (batch, heads, n, n), softmax probabilities; hidden states (batch, n, d);
``mask`` the (batch, n) attention mask, 1 on real tokens, 0 on padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def attention_enhancement(attention: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AE(A) = sum over heads of |A_h|^p: (batch, heads, n, n) -> (batch, n, n)."""
    return attention.abs().pow(p).sum(dim=1)


def attention_map(attention: torch.Tensor, mask: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Q = vec(AE(A)) / ||vec(AE(A))||_2 with padding rows and columns zeroed before the norm:
    (batch, n * n), each row of unit length."""
    pair = (mask[:, :, None] * mask[:, None, :]).to(attention.dtype)
    return F.normalize((attention_enhancement(attention, p) * pair).flatten(1), p=2.0, dim=1)


def attention_transfer_loss(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], mask: torch.Tensor, p: float = 2.0,
    samples: float | None = None,
) -> torch.Tensor:
    """L_at = sum over the given layers of mean over the batch of ||Q_T - Q_S||_2. ``samples``:
    divide the batch's sum by this instead of its size (under DDP, the global batch's size over
    the number of processes, so that the processes' average is the global mean)."""
    total = teacher[0].new_zeros(())
    for a_t, a_s in zip(teacher, student, strict=True):
        diff = attention_map(a_t, mask, p) - attention_map(a_s, mask, p)
        # sqrt(sum sq + tiny): the norm's gradient stays finite when the maps coincide
        norms = (diff.pow(2).sum(dim=1) + 1e-12).sqrt()
        total = total + (norms.mean() if samples is None else norms.sum() / samples)
    return total


def hidden_state_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], mask: torch.Tensor,
                      tokens: float | None = None) -> torch.Tensor:
    """L_hid = sum over the given layers of the MSE between teacher and student hidden states,
    averaged over the real (non-padding) token positions of the batch and the hidden units.
    ``tokens``: the number of real tokens to average over instead of the batch's own (under
    DDP, the global batch's over the number of processes)."""
    m = mask.to(teacher[0].dtype).unsqueeze(-1)
    count = (m.sum() if tokens is None else tokens) * teacher[0].shape[-1]
    total = teacher[0].new_zeros(())
    for h_t, h_s in zip(teacher, student, strict=True):
        total = total + ((h_t - h_s).pow(2) * m).sum() / count
    return total


ABLATIONS = (None, "no-att", "no-hid", "ce-only")


class DistillationLoss(nn.Module):
    """L = alpha * L_at + beta * L_hid + L_ce.

    Args:
        alpha, beta: weights of the attention-transfer and hidden-state terms.
        p: Attention Enhancement exponent.
        att_layers: transformer layers (0-based) whose attentions are distilled; None: all.
        hid_layers: hidden states distilled, 0 = the embedding output, l = layer l's output;
            None: all (embedding + every layer).
        ablation: ``no-att`` (alpha = 0), ``no-hid`` (beta = 0), ``ce-only`` (both 0: the
            paper's "CD"), or None.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        p: float = 2.0,
        att_layers: Sequence[int] | None = None,
        hid_layers: Sequence[int] | None = None,
        ablation: str | None = None,
    ) -> None:
        super().__init__()
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        self.alpha = 0.0 if ablation in ("no-att", "ce-only") else alpha
        self.beta = 0.0 if ablation in ("no-hid", "ce-only") else beta
        self.p = p
        self.att_layers = None if att_layers is None else list(att_layers)
        self.hid_layers = None if hid_layers is None else list(hid_layers)

    @property
    def needs_attentions(self) -> bool:
        """Whether the loss reads attention probabilities (alpha != 0)."""
        return self.alpha != 0.0

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the loss reads hidden states (beta != 0)."""
        return self.beta != 0.0

    @staticmethod
    def _pick(states: Sequence[torch.Tensor], layers: list[int] | None, what: str) -> list[torch.Tensor]:
        if layers is None:
            return list(states)
        bad = [i for i in layers if not 0 <= i < len(states)]
        if bad:
            raise IndexError(f"{what} layers {bad} outside 0..{len(states) - 1}")
        return [states[i] for i in layers]

    def forward(self, teacher_out, student_out, labels: torch.Tensor, mask: torch.Tensor,
                samples: float | None = None, tokens: float | None = None) -> dict[str, torch.Tensor]:
        """``teacher_out`` / ``student_out``: HF model outputs with ``logits`` and, as needed,
        ``attentions`` and ``hidden_states``; ``samples``, ``tokens``: the normalisers of the
        attention and hidden-state terms (see their functions; None: this batch's own). Returns
        every term and their weighted sum ``loss``."""
        ce = F.cross_entropy(student_out.logits, labels)
        zero = ce.new_zeros(())
        at = hid = zero
        if self.needs_attentions:
            at = attention_transfer_loss(
                self._pick(teacher_out.attentions, self.att_layers, "attention"),
                self._pick(student_out.attentions, self.att_layers, "attention"),
                mask, self.p, samples,
            )
        if self.needs_hidden_states:
            hid = hidden_state_loss(
                self._pick(teacher_out.hidden_states, self.hid_layers, "hidden-state"),
                self._pick(student_out.hidden_states, self.hid_layers, "hidden-state"),
                mask, tokens,
            )
        return {"loss": self.alpha * at + self.beta * hid + ce, "at": at, "hid": hid, "ce": ce}
