"""Mitigations: clean a suspicious checkpoint with a little clean data. Each builds on
``Mitigation`` (``base``): MBTSAD (``mbtsad``) and the weight-space methods (``weight_space``);
``detection`` finds triggers without training (the scan behind ``mitigate scan``).
Clean fine-tuning (CFT) and TS-FT alone are ``mitigate.classifier.TextClassifier`` on the clean
subset."""

from mitigate.mitigations.base import Mitigation
from mitigate.mitigations.detection import TriggerInversion, TriggerScan
from mitigate.mitigations.mbtsad import MBTSAD
from mitigate.mitigations.weight_space import EPUR, FineMixing, FinePruning, FinePurifying, Reinit, WeightSpaceMitigation

__all__ = ["EPUR", "MBTSAD", "FineMixing", "FinePruning", "FinePurifying", "Mitigation", "Reinit", "TriggerInversion", "TriggerScan", "WeightSpaceMitigation"]
