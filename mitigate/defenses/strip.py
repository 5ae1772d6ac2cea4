"""STRIP: perturb an input many times by replacing words; a trigger keeps the prediction fixed
(low entropy) where a clean input's prediction wavers."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def perturb(text: str, pool: Sequence[str], ratio: float, copies: int, rng: random.Random) -> list[str]:
    """``copies`` variants of ``text``, each with ``max(1, round(ratio * n))`` of its n words
    (chosen at random) replaced by words drawn from ``pool``."""
    words = text.split()
    if not words or not pool:
        return [text] * copies
    k = min(len(words), max(1, round(ratio * len(words))))
    out = []
    for _ in range(copies):
        w = list(words)
        for i in rng.sample(range(len(words)), k):
            w[i] = rng.choice(pool)
        out.append(" ".join(w))
    return out


def copy_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Prediction entropy -sum_i y_i log y_i of each copy: probs (..., classes) -> (...)."""
    p = probs.float()
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def decided(h: torch.Tensor, threshold: float, z: float) -> torch.Tensor:
    """Sequential test of STRIP's decision after k copies: True for the inputs whose mean
    entropy's interval mean +- z * std / sqrt(k) (std over their k copies) lies wholly on one
    side of ``threshold``; those need no more copies. h: (inputs, k)."""
    k = h.shape[1]
    if k < 2:
        return torch.zeros(h.shape[0], dtype=torch.bool)
    m, half = h.mean(1), z * h.std(1) / k**0.5
    return (m + half < threshold) | (m - half > threshold)


def strip_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(x) = (1/N) Σ_n Σ_i −y_i^n log y_i^n for probs of shape (inputs, N copies, classes):
    the entropy of each copy, averaged over the copies of the SAME input (never across
    inputs). Returns (inputs,)."""
    if probs.dim() != 3:
        raise ValueError(f"expected (inputs, copies, classes) probabilities, got shape {tuple(probs.shape)}")
    return copy_entropy(probs).mean(-1)
