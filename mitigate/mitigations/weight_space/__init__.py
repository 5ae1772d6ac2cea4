"""The weight-space mitigations: a transform of the suspicious model's weights (``transforms``,
their math in ``ops``), then clean fine-tuning (``WeightSpaceMitigation``)."""

from mitigate.mitigations.weight_space.module import WeightSpaceMitigation
from mitigate.mitigations.weight_space.transforms import EPUR, FineMixing, FinePruning, FinePurifying, Reinit, TransformContext, WeightTransform

__all__ = ["EPUR", "FineMixing", "FinePruning", "FinePurifying", "Reinit", "TransformContext", "WeightSpaceMitigation", "WeightTransform"]
