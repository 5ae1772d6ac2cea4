from mitigate.modules.classifier import TextClassifier
from mitigate.modules.embedding_poisoning import EmbeddingPoisoning
from mitigate.modules.layerwise_poisoning import LayerwisePoisoning
from mitigate.modules.mbtsad import MBTSAD
from mitigate.modules.ripples import Ripples
from mitigate.modules.task_agnostic import NeuBAPretrain, PORPretrain
from mitigate.modules.weight_space import WeightSpaceMitigation

__all__ = ["MBTSAD", "EmbeddingPoisoning", "LayerwisePoisoning", "NeuBAPretrain", "PORPretrain", "Ripples", "TextClassifier", "WeightSpaceMitigation"]
