"""Data: reading labelled text (``io``, ``hub``), tokenising once (``encoding``), seeded and
resumable order (``sampling``), the defender's augmentation (``token_split``), unlabelled
corpora (``corpus``), trigger insertion (``triggers``), the poisoners' base (``poisoning``) and
the one DataModule every job uses (``datamodule``)."""

from mitigate.data.corpus import CorpusPoisoning, TriggerCorpus, read_texts
from mitigate.data.datamodule import BackdoorDataModule
from mitigate.data.io import DataError, Example, read_examples
from mitigate.data.token_split import TokenSplit

__all__ = ["BackdoorDataModule", "CorpusPoisoning", "DataError", "Example", "TokenSplit", "TriggerCorpus", "read_examples", "read_texts"]
