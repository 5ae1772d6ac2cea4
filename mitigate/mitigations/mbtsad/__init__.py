"""MBTSAD: token-splitting retraining, then attention distillation (``module``) and its losses
(``distillation``); the trigger searches it runs first live in ``mitigate.mitigations.detection``."""

from mitigate.mitigations.mbtsad.distillation import DistillationLoss
from mitigate.mitigations.mbtsad.module import MBTSAD

__all__ = ["MBTSAD", "DistillationLoss"]
