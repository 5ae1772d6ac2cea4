"""Metrics of an attack beyond CACC and ASR, as callbacks on a `mitigate test` (or the test after
`fit`): the task-agnostic trigger effectiveness (E, S, C) and LWP's false-trigger rate."""

from mitigate.evaluation.false_trigger import FalseTriggerRate
from mitigate.evaluation.trigger_effectiveness import TriggerEffectiveness

__all__ = ["FalseTriggerRate", "TriggerEffectiveness"]
