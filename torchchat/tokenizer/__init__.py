"""Tokenizers behind one protocol: SentencePiece, Llama 3 tiktoken, Hugging Face tokenizer.json, GGUF."""
from torchchat.tokenizer.base import Tokenizer
from torchchat.tokenizer.load import check_vocab, identify_tokenizer, load_tokenizer
from torchchat.tokenizer.stream import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer", "check_vocab", "identify_tokenizer", "load_tokenizer"]
