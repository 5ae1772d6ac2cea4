"""mitigate: remove and guard against backdoors in text classifiers, on PyTorch Lightning."""

__version__ = "0.1.0"
