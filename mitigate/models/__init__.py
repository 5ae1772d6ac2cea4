from mitigate.models.loading import OFFLINE_MODELS, UnsafeCheckpointError, load_classifier, load_tokenizer

__all__ = ["OFFLINE_MODELS", "UnsafeCheckpointError", "load_classifier", "load_tokenizer"]
