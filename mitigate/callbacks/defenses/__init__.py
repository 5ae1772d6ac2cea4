"""Test-time defenses as Lightning callbacks: add any of them to a `mitigate test` (or `fit`) run."""

from mitigate.callbacks.defenses.base import Defense
from mitigate.callbacks.defenses.imbert import IMBERT
from mitigate.callbacks.defenses.onion import ONION
from mitigate.callbacks.defenses.rap import RAP
from mitigate.callbacks.defenses.strip import STRIP

__all__ = ["IMBERT", "ONION", "RAP", "STRIP", "Defense"]
