from mitigate.modules.classifier import TextClassifier

__all__ = ["TextClassifier"]
