"""MBTSAD: token-splitting retraining, then attention distillation (``module``), its losses
(``distillation``) and the defender-side trigger scan (``trigger_scan``)."""

from mitigate.mitigations.mbtsad.distillation import DistillationLoss
from mitigate.mitigations.mbtsad.module import MBTSAD
from mitigate.mitigations.mbtsad.trigger_scan import TriggerScan

__all__ = ["MBTSAD", "DistillationLoss", "TriggerScan"]
