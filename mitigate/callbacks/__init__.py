from mitigate.callbacks.export import ExportPretrained
from mitigate.callbacks.predictions import PredictionWriter
from mitigate.callbacks.results import ResultsWriter, write_results

__all__ = ["ExportPretrained", "PredictionWriter", "ResultsWriter", "write_results"]
