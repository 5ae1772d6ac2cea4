from mitigate.modules.classifier import TextClassifier
from mitigate.modules.mbtsad import MBTSAD

__all__ = ["MBTSAD", "TextClassifier"]
