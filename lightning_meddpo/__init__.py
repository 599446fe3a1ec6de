"""lightning_meddpo: preference optimization for medical vision-language models on PyTorch Lightning."""

__version__ = "0.1.0"
