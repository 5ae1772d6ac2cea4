from mitigate.data.corpus import CorpusPoisoning, TriggerCorpus, read_texts
from mitigate.data.datamodule import BackdoorDataModule
from mitigate.data.io import DataError, Example, read_examples

__all__ = ["BackdoorDataModule", "DataError", "Example", "read_examples"]
