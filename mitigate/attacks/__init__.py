"""Attacks, to reproduce and study them: data poisoners (``poisoners``: BadNet, InsertSent, LWP's
combination trigger, pre-poisoned files) that a ``TextClassifier`` trains on, and the attacks
that write the backdoor into the weights (EP, LWP, RIPPLES) or into a pre-trained encoder
(POR, NeuBA)."""

from mitigate.attacks.ep import EmbeddingPoisoning
from mitigate.attacks.lwp import LayerwisePoisoning
from mitigate.attacks.poisoners import BadNet, CombinationTrigger, InsertSent, PrePoisoned
from mitigate.attacks.ripples import Ripples
from mitigate.attacks.task_agnostic import NeuBAPretrain, PORPretrain

__all__ = [
    "BadNet", "CombinationTrigger", "EmbeddingPoisoning", "InsertSent", "LayerwisePoisoning", "NeuBAPretrain",
    "PORPretrain", "PrePoisoned", "Ripples",
]
