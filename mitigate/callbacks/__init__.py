from mitigate.callbacks.checkpoint import RunCheckpoint
from mitigate.callbacks.export import ExportPretrained
from mitigate.callbacks.false_trigger import FalseTriggerRate
from mitigate.callbacks.predictions import PredictionWriter
from mitigate.callbacks.results import ResultsWriter, write_results
from mitigate.callbacks.trigger_effectiveness import TriggerEffectiveness

__all__ = ["RunCheckpoint", "ExportPretrained", "FalseTriggerRate", "PredictionWriter", "ResultsWriter", "TriggerEffectiveness", "write_results"]
