"""Streaming detokenization: text deltas for one token at a time, never a broken character."""
from __future__ import annotations

from typing import Sequence

from torchchat.tokenizer.base import Tokenizer

_REPLACEMENT = "\ufffd"

# How many trailing prompt ids give the first generated token its context: one would do for spacing;
# a few make it likely that the window starts on a whole character.
_PREFIX_TOKENS = 4


class StreamDecoder:
    """Turns generated ids into text pieces whose concatenation equals `tokenizer.decode(all_ids)`
    (with a `prefix`: what `decode(prefix + all_ids)` adds to `decode(prefix)`).

    Why not decode each id alone: SentencePiece drops the leading space of the first piece it decodes
    ("▁world" alone is "world", after "Hello" it is " world"), and one character may span several
    byte tokens. So each step decodes a small window: the tokens emitted last time (the prefix, which
    gives the new token its spacing) plus the tokens not yet emitted, and emits what the window adds
    to the prefix's own text. While the window's text ends in U+FFFD the last character may still be
    incomplete, so nothing is emitted until a later token completes it (or `flush`). Each call costs
    two decodes of a few tokens, whatever the length of the generation.
    """

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = ()):
        """`prefix`: ids already shown (the prompt); their text is not emitted again, but the first new
        token is spaced as it follows them (SentencePiece's "▁world" after "Hello" is " world")."""
        self._tok = tokenizer
        # Ids whose text depends on the ids after them (see HFTokenizer.holdback_ids): wait past them.
        self._holdback: frozenset[int] = getattr(tokenizer, "holdback_ids", frozenset())
        self._window: list[int] = [int(i) for i in prefix[-_PREFIX_TOKENS:]]  # the prefix, then ids not yet emitted
        self._prefix_len = len(self._window)
        self._prefix_text = tokenizer.decode(self._window)  # decode(self._window[: self._prefix_len])

    def add(self, token_id: int) -> str:
        """Take one more id; returns the newly completed text ("" while a character is incomplete)."""
        token_id = int(token_id)
        self._window.append(token_id)
        if token_id in self._holdback:
            return ""
        text = self._tok.decode(self._window)
        if text.endswith(_REPLACEMENT):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """Everything still held back (an incomplete character is rendered as U+FFFD); resets the stream
        to a fresh one without prefix."""
        out = self._emit(self._tok.decode(self._window)) if len(self._window) > self._prefix_len else ""
        self._window, self._prefix_len, self._prefix_text = [], 0, ""
        return out

    def _emit(self, text: str) -> str:
        # The window starts where an earlier decode ended on a complete character, so its text extends
        # the prefix's text (tested for SentencePiece, tiktoken and byte-level BPE).
        delta = text[len(self._prefix_text) :]
        emitted = self._window[self._prefix_len :]
        emitted_text = self._tok.decode(emitted)
        if emitted_text:
            self._window, self._prefix_text = emitted, emitted_text
        else:
            # Tokens that render as nothing (SentencePiece's <s>, </s>) do not count as "the start" for
            # its leading-space rule, so they cannot stand alone as the prefix: keep the older one too.
            self._prefix_text = text
        self._prefix_len = len(self._window)
        return delta
