"""torchchat: run Llama-family language models with PyTorch."""

__version__ = "0.1.0"
