"""Tokenizers behind one protocol: SentencePiece, Llama 3 tiktoken, Hugging Face tokenizer.json."""
from torchchat.tokenizer.base import Tokenizer

__all__ = ["Tokenizer"]
