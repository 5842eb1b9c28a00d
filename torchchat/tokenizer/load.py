"""Pick the tokenizer kind from a file's content (never from its name, never by trial and error)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from torchchat.errors import TokenizerError
from torchchat.tokenizer.base import Tokenizer

SUPPORTED = (
    "SentencePiece tokenizer.model (Llama 2), tiktoken tokenizer.model (Llama 3), "
    "Hugging Face tokenizer.json (or a folder holding one), GGUF file"
)

# A tiktoken ranks file starts with a line `<base64 of the token's bytes> <rank>`.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")

_HEAD_BYTES = 4096


def identify_tokenizer(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """(kind, file) of the tokenizer at `path`, the kind ("sentencepiece", "tiktoken", "hf" or "gguf")
    read from the file's first bytes. A directory is looked into for tokenizer.json, then
    tokenizer.model. Raises TokenizerError naming the path and the supported kinds for anything else
    (missing, empty, unreadable, unknown content).
    """
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return identify_tokenizer(p / name)
        raise TokenizerError(f"{p} holds neither tokenizer.json nor tokenizer.model; supported: {SUPPORTED}")
    try:
        with open(p, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except FileNotFoundError as e:
        raise TokenizerError(f"tokenizer {p} does not exist; check the path (supported: {SUPPORTED})") from e
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {p}: {e.strerror}; check the path") from e
    if not head:
        raise TokenizerError(f"tokenizer {p} is empty; download it again (supported: {SUPPORTED})")
    if head.startswith(b"GGUF"):
        return "gguf", p
    if head.lstrip().startswith(b"{"):
        return "hf", p
    if _TIKTOKEN_LINE.match(head):
        return "tiktoken", p
    if _looks_like_sentencepiece(head):
        return "sentencepiece", p
    raise TokenizerError(
        f"{p} is not a tokenizer this program knows; supported: {SUPPORTED} "
        "(a llama2.c tokenizer.bin is not: pass the tokenizer.model it was made from)"
    )


def _looks_like_sentencepiece(head: bytes) -> bool:
    """A serialized sentencepiece ModelProto starts with its first `pieces` entry: field 1,
    length-delimited (0x0A), a varint length, then that SentencePiece's `piece` string: again 0x0A."""
    if not head.startswith(b"\x0a"):
        return False
    pos, length, shift = 1, 0, 0
    while pos < len(head) and pos < 6:
        byte = head[pos]
        length |= (byte & 0x7F) << shift
        shift += 7
        pos += 1
        if not byte & 0x80:
            return 0 < length and head[pos : pos + 1] == b"\x0a"
    return False


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load the tokenizer at `path` (file or folder) as the kind its content shows."""
    kind, file = identify_tokenizer(path)
    if kind == "sentencepiece":
        from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(file)
    if kind == "tiktoken":
        from torchchat.tokenizer.tiktoken import TiktokenTokenizer

        return TiktokenTokenizer(file)
    if kind == "hf":
        from torchchat.tokenizer.hf import HFTokenizer

        return HFTokenizer(file)
    from torchchat.tokenizer.gguf import tokenizer_from_gguf

    return tokenizer_from_gguf(file)


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raise TokenizerError if the tokenizer can produce ids the model has no embedding row for.

    A model may have more rows than the tokenizer has tokens (vocabularies padded to a multiple of
    64 or 128); fewer means the tokenizer belongs to another model.
    """
    if tokenizer.vocab_size > vocab_size:
        source = getattr(tokenizer, "source", tokenizer.kind)
        raise TokenizerError(
            f"tokenizer {source} has {tokenizer.vocab_size} tokens but the model's vocabulary has only "
            f"{vocab_size}; use the tokenizer that belongs to this model"
        )
