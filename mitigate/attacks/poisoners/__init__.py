"""Attacks as data poisoners: each turns clean examples into poisoned ones with recorded
triggers (the data module trains on the mix and measures ASR with the poisoned test set)."""

from mitigate.attacks.poisoners.badnet import BadNet
from mitigate.attacks.poisoners.combination import CombinationTrigger
from mitigate.attacks.poisoners.insertsent import InsertSent
from mitigate.attacks.poisoners.prepoisoned import PrePoisoned

__all__ = ["BadNet", "CombinationTrigger", "InsertSent", "PrePoisoned"]
