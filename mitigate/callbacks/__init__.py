from mitigate.callbacks.export import ExportPretrained
from mitigate.callbacks.results import ResultsWriter, write_results

__all__ = ["ExportPretrained", "ResultsWriter", "write_results"]
