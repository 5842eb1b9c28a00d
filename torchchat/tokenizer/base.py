"""The Tokenizer protocol every tokenizer kind implements, and streaming detokenization."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    kind: str  # "sentencepiece" | "tiktoken" | "hf" | "gguf"
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation (eos, and eot-like tokens such as Llama 3's <|eot_id|>)."""
        ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids. `allow_special` parses special-token strings (e.g. "<|eot_id|>") as single ids;
        otherwise they are encoded as plain text."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special tokens are rendered as their text; invalid UTF-8 becomes U+FFFD."""
        ...

    def special_id(self, text: str) -> int | None:
        """Id of a special token given as text ("<|eot_id|>", "</s>"), or None if there is none."""
        ...
