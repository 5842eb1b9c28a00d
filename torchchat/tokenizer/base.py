"""The Tokenizer protocol every tokenizer kind implements, and small helpers they share."""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from torchchat.errors import TokenizerError


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
        """Ids -> text; special tokens are rendered as their text (SentencePiece control pieces such as
        <s> render as nothing, as in `sentencepiece`); invalid UTF-8 becomes U+FFFD."""
        ...

    def special_id(self, text: str) -> int | None:
        """Id of a special token given as text ("<|eot_id|>", "</s>"), or None if there is none."""
        ...

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes as they appear in generated text (SentencePiece's "▁" as a space, byte
        pieces as their byte, byte-level BPE's alphabet mapped back to bytes); None for special and
        control tokens, which are not text. Length vocab_size. For grammar-constrained decoding."""
        ...


def add_bos_eos(tok: Tokenizer, ids: list[int], bos: bool, eos: bool) -> list[int]:
    """Put BOS in front of / EOS after `ids` (in place) when asked; a tokenizer without one is an error."""
    source = getattr(tok, "source", tok.kind)
    if bos:
        if tok.bos_id is None:
            raise TokenizerError(f"{source} defines no BOS token; encode without bos=True")
        ids.insert(0, tok.bos_id)
    if eos:
        if tok.eos_id is None:
            raise TokenizerError(f"{source} defines no EOS token; encode without eos=True")
        ids.append(tok.eos_id)
    return ids


def check_ids(ids: Iterable[int], vocab_size: int, source: str) -> None:
    """Raise TokenizerError for an id outside [0, vocab_size)."""
    for i in ids:
        if not 0 <= i < vocab_size:
            raise TokenizerError(
                f"token id {i} is outside the vocabulary of {source} (0..{vocab_size - 1}); "
                "the model and the tokenizer do not belong together"
            )


def special_pattern(specials: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of the special-token strings, longest first (so "<|eot_id|>" is never cut
    short by a shorter token that is its prefix); None when there are none."""
    texts = sorted((s for s in specials if s), key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in texts)) if texts else None


def split_special(
    text: str, pattern: re.Pattern[str] | None, ids: Mapping[str, int]
) -> Iterator[tuple[str, int | None]]:
    """Cut `text` at special-token strings: yields (fragment, None) for plain text and ("", id) for
    each special token, in order. Empty fragments are not yielded."""
    pos = 0
    if pattern is not None:
        for m in pattern.finditer(text):
            if m.start() > pos:
                yield text[pos : m.start()], None
            yield "", ids[m.group()]
            pos = m.end()
    if pos < len(text):
        yield text[pos:], None
