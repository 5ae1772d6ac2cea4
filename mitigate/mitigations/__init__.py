"""Mitigations: clean a suspicious checkpoint with a little clean data. Each builds on
``Mitigation`` (``base``): MBTSAD (``mbtsad``) and the weight-space methods (``weight_space``).
Clean fine-tuning (CFT) and TS-FT alone are ``mitigate.classifier.TextClassifier`` on the clean
subset."""

from mitigate.mitigations.base import Mitigation
from mitigate.mitigations.mbtsad import MBTSAD, TriggerScan
from mitigate.mitigations.weight_space import EPUR, FineMixing, FinePruning, FinePurifying, Reinit, WeightSpaceMitigation

__all__ = ["EPUR", "MBTSAD", "FineMixing", "FinePruning", "FinePurifying", "Mitigation", "Reinit", "TriggerScan", "WeightSpaceMitigation"]
