"""Llama 3 / 3.1 tokenizer: a tiktoken ranks file plus the 256 special tokens Meta adds in code."""
from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Iterator, Sequence

from torchchat.errors import TokenizerError
from torchchat.tokenizer.base import add_bos_eos, check_ids, special_pattern, split_special

# Llama 3's pre-tokenizer (the cl100k pattern): contractions, letters with one leading non-letter,
# numbers in groups of up to 3 digits, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256

# Llama 3.1's names for the first special ids; the rest are <|reserved_special_token_N|>.
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# tiktoken's regex engine gives up ("Max stack size exceeded for backtracking") on whitespace runs
# of a few hundred thousand characters; runs of one character class are cut into pieces this long,
# as Meta's reference tokenizer does (25,000). Only text inside such a run tokenizes differently.
_MAX_RUN = 25_000
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_MAX_RUN + 1},}}|(?<!\s)\s{{{_MAX_RUN + 1},}}")


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """The 256 special tokens (Llama 3.1 names), numbered from `num_base_tokens` (128000 for Llama 3)."""
    names = list(_NAMED_SPECIALS)
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(names))]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `base64(token bytes) rank` line per token, ranks 0..n-1."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read tiktoken tokenizer {path}: {e.strerror}; check the path") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{path} line {lineno} is not a tiktoken `base64 rank` line; pass the tokenizer.model of a "
                "Llama 3 checkpoint"
            ) from e
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: tiktoken ranks must be distinct and numbered 0..n-1; the file is damaged")
    # Byte-level BPE starts from single bytes: tiktoken's Rust core panics (an uncatchable-looking
    # PanicException, a plain-text 500 in the server) on text holding a byte that has no rank.
    missing = sum(1 for b in range(256) if bytes([b]) not in ranks)
    if missing:
        raise TokenizerError(
            f"{path}: {missing} of the 256 single bytes have no rank, so some text cannot be encoded; the file is "
            "damaged or not a tiktoken BPE vocabulary"
        )
    return ranks


class TiktokenTokenizer:
    """Llama 3 / 3.1 / 3.2 tokenizer over `tiktoken`, with Meta's regex and special tokens."""

    kind = "tiktoken"

    def __init__(self, path: str | os.PathLike[str]):
        import tiktoken

        self.source = os.fspath(path)
        ranks = read_tiktoken_ranks(self.source)
        self._specials = llama3_special_tokens(len(ranks))
        self._enc = tiktoken.Encoding(
            name=os.path.basename(self.source),
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self._specials,
        )
        self._special_re = special_pattern(self._specials)
        self.vocab_size: int = len(ranks) + len(self._specials)
        self.bos_id: int | None = self._specials["<|begin_of_text|>"]
        self.eos_id: int | None = self._specials["<|end_of_text|>"]
        self.add_bos = True
        self.chat_template: str | None = None
        # Llama 3.1 ends an assistant turn with <|eot_id|>, a tool call with <|eom_id|>.
        self._stop_ids = frozenset(self._specials[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        ids: list[int] = []
        fragments = split_special(text, self._special_re, self._specials) if allow_special else [(text, None)]
        for fragment, special in fragments:
            if special is not None:
                ids.append(special)
                continue
            for piece in _bounded_runs(fragment):
                ids += self._enc.encode_ordinary(piece)
        return add_bos_eos(self, ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        check_ids(ids, self.vocab_size, self.source)
        return self._enc.decode(ids, errors="replace")

    def special_id(self, text: str) -> int | None:
        return self._specials.get(text)

    def token_bytes(self) -> list[bytes | None]:
        n_ranks = self.vocab_size - len(self._specials)
        return [self._enc.decode_single_token_bytes(i) for i in range(n_ranks)] + [None] * len(self._specials)


def _bounded_runs(text: str) -> Iterator[str]:
    """Cut `text` inside whitespace / non-whitespace runs longer than _MAX_RUN characters, keeping
    each run's first and last piece joined to its neighbours so ordinary text is not affected."""
    if len(text) <= _MAX_RUN:
        yield text
        return
    start = 0
    for m in _LONG_RUN.finditer(text):
        for cut in range(m.start() + _MAX_RUN, m.end(), _MAX_RUN):
            yield text[start:cut]
            start = cut
    yield text[start:]
