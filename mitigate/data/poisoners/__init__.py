"""Attacks as data poisoners: each turns clean examples into poisoned ones with recorded triggers."""

from mitigate.data.poisoners.badnet import BadNet
from mitigate.data.poisoners.combination import CombinationTrigger
from mitigate.data.poisoners.base import Poisoner, insert_words
from mitigate.data.poisoners.insertsent import InsertSent
from mitigate.data.poisoners.prepoisoned import PrePoisoned

__all__ = ["BadNet", "CombinationTrigger", "InsertSent", "Poisoner", "PrePoisoned", "insert_words"]
