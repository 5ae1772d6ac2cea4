"""Test-time defenses as Lightning callbacks: add any of them to a `mitigate test` (or `fit`) run.
Each file holds one defense, its math first and its callback last; ``base`` what they share."""

from mitigate.defenses.base import Defense
from mitigate.defenses.imbert import IMBERT
from mitigate.defenses.onion import ONION
from mitigate.defenses.rap import RAP
from mitigate.defenses.strip import STRIP

__all__ = ["IMBERT", "ONION", "RAP", "STRIP", "Defense"]
