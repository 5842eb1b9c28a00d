"""Grammar-constrained decoding with llguidance: a JSON schema (or a Lark grammar) becomes a logits
processor that lets the model sample only tokens the grammar allows next.

The grammar library works on token bytes, so the vocabulary is spelled from our own tokenizer
(`Tokenizer.token_bytes`: SentencePiece, tiktoken, Hugging Face tokenizers, GGUF) once per tokenizer.
Each constrained sequence gets its own matcher, which follows the sequence's generated tokens and
builds the next token's mask. Stop tokens (the tokenizer's EOS, the chat format's end of turn) are
allowed exactly when the grammar accepts what was generated, so a sequence ends only on a complete
value; once the grammar can take nothing more, only stop tokens are allowed.

llguidance is imported when the first grammar is compiled (`pip install llguidance`, pinned in
pyproject.toml)."""
from __future__ import annotations

import json
import logging
import threading
import weakref
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from torchchat.errors import TorchchatError

log = logging.getLogger("torchchat.generation")

# Whitespace the JSON grammar allows between tokens: one space, or a newline and an indent of up to 20
# spaces or tabs (pretty-printing). Bounded, so a model (a tiny random one above all)
# cannot spend its whole budget on blanks; enough for a pretty-printed object a few levels deep.
# None is allowed before the value or after it.
JSON_WHITESPACE = r"(\x20|\x0A[\x20\x09]{0,20})"


class GrammarError(TorchchatError, ValueError):
    """A schema or grammar llguidance cannot compile; the message says why."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise GrammarError("constrained decoding needs llguidance: pip install llguidance "
                           "(or ./install/install_requirements.sh)") from e
    return llguidance


def json_schema_grammar(schema: dict[str, Any] | None, *, strict: bool = True) -> str:
    """An llguidance grammar for JSON values matching `schema` (None: any JSON object). With
    `strict` False, keywords llguidance does not implement are ignored instead of refused."""
    llg = _llguidance()
    schema = {"type": "object"} if schema is None else schema
    options = {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
    except ValueError as e:
        raise GrammarError(str(e)) from e
    check_grammar(grammar)
    return grammar


def lark_grammar(text: str) -> str:
    """An llguidance grammar from Lark text (llguidance's dialect: `%json {schema}` embeds a schema)."""
    grammar = _llguidance().LLMatcher.grammar_from_lark(text)
    check_grammar(grammar)
    return grammar


def check_grammar(grammar: str) -> None:
    """Raise GrammarError when llguidance refuses the grammar (bad regex, unknown format, bad $ref)."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(_one_line(messages[0]))


def _one_line(message: str) -> str:
    """llguidance's message on one line (its regex errors span several), at most 300 characters."""
    return " ".join(message.split())[:300]


class GrammarVocabulary:
    """A tokenizer's vocabulary as llguidance sees it: every id's bytes, special ids marked."""

    def __init__(self, tokenizer):
        llg = _llguidance()
        spelled = tokenizer.token_bytes()
        specials = [i for i, b in enumerate(spelled) if b is None]
        tokens = [b if b is not None else _special_text(tokenizer, i) for i, b in enumerate(spelled)]
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids, default=0)

        by_bytes = {b: i for i, b in enumerate(spelled) if b}
        longest = max(map(len, by_bytes), default=1)

        def encode(data: bytes) -> list[int]:
            """Ids whose bytes are exactly `data`: the tokenizer's own encoding where it spells the
            bytes back (SentencePiece adds a dummy-prefix space, which llguidance must not see),
            else greedy longest matches."""
            ids = tokenizer.encode(data.decode("utf-8", "replace"))
            if ids and spelled[ids[0]] == b" " and not data.startswith(b" "):
                ids = ids[1:]
            if b"".join(spelled[i] or b"" for i in ids) == data:
                return ids
            out, pos = [], 0
            while pos < len(data):
                for n in range(min(longest, len(data) - pos), 0, -1):
                    if data[pos : pos + n] in by_bytes:
                        out.append(by_bytes[data[pos : pos + n]])
                        pos += n
                        break
                else:
                    pos += 1  # a byte no token spells: cannot be generated anyway
            return out

        class _Spelling:  # what llguidance.TokenizerWrapper reads
            eos_token_id = eos
            bos_token_id = tokenizer.bos_id
            special_token_ids = specials

            def __init__(self):
                self.tokens = tokens

            def __call__(self, data: bytes) -> list[int]:
                return encode(data)

        self.vocab_size = len(tokens)
        self.spelled = spelled
        self.by_bytes = by_bytes
        self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_Spelling()))


def _special_text(tokenizer, i: int) -> bytes:
    text = tokenizer.decode([i])
    return (text or f"<special_{i}>").encode("utf-8")


_VOCABS: "weakref.WeakKeyDictionary[Any, GrammarVocabulary]" = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def grammar_vocabulary(tokenizer) -> GrammarVocabulary:
    """The tokenizer's GrammarVocabulary, built on first use (about a second for 128k tokens)."""
    with _VOCABS_LOCK:
        vocab = _VOCABS.get(tokenizer)
        if vocab is None:
            vocab = _VOCABS[tokenizer] = GrammarVocabulary(tokenizer)
        return vocab


class GrammarConstraint:
    """A logits processor for one sequence: (ids generated so far, logits (V,)) -> logits (V,) with
    every token the grammar does not allow next at -inf. Call it once per generated token, in order.

    With `budget` (the most tokens the sequence may generate) and `close_json`, the output is JSON
    that must be complete by then: once the shortest way to close what is open (strings, arrays,
    objects; see json_closing) needs nearly all the tokens left, those closing tokens are forced, so a
    model that rambles (a tiny random one) still ends with a complete value instead of "length".
    Where the grammar refuses that closing (a schema's required key is missing), the text the grammar
    forces anyway is taken; where it leaves a choice, the model chooses."""

    # Tokens kept in reserve beyond the closing bytes: a multi-byte character cut inside a string
    # must be completed before the string can close.
    CLOSE_SLACK = 4

    def __init__(self, vocab: GrammarVocabulary, grammar: str, stop_ids: frozenset[int], *,
                 budget: int | None = None, close_json: bool = False, json_between: tuple[bytes, bytes] = (b"", b"")):
        """`json_between`: the text the grammar puts before and after the JSON value (a tool call's
        tags), for closing it in time."""
        self.matcher = _llguidance().LLMatcher(vocab.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_one_line(self.matcher.get_error()))
        self.vocab = vocab
        self.stop_ids = sorted(stop_ids)
        self._stops = frozenset(stop_ids)
        self.budget, self.close_json, self.json_between = budget, close_json, json_between
        self._consumed = 0
        self._before_left = json_between[0]  # what of the text before the JSON value is still to come
        self._closer = JsonCloser()
        self._closing_now = False

    def __call__(self, generated: Sequence[int], logits: Tensor) -> Tensor:
        for token in generated[self._consumed :]:
            if token not in self._stops:
                self.matcher.consume_token(int(token))
                if self.close_json and token < self.vocab.vocab_size:
                    self._follow(self.vocab.spelled[token] or b"")
        self._consumed = len(generated)
        allowed = self.allowed(logits.size(-1))
        if self.close_json and self.budget is not None:
            allowed = self._closing(allowed, self.budget - len(generated))
        return torch.where(allowed.to(logits.device, non_blocking=True), logits, float("-inf"))

    def _closing(self, allowed: Tensor, left: int) -> Tensor:
        suffix = self._closing_suffix()
        if suffix is None or (not self._closing_now and len(suffix) + 1 + self.CLOSE_SLACK < left):
            return allowed
        self._closing_now = True  # from here on (a forced token may close several bytes at once)
        forced = torch.zeros_like(allowed)
        if not suffix:  # complete: end now
            stops = [i for i in self.stop_ids if i < allowed.numel() and allowed[i]]
            forced[stops] = True
            return forced if stops else allowed
        # The closing text, else what the grammar forces anyway (a schema's required key), else free.
        for text in (suffix, self.matcher.compute_ff_bytes()):
            for n in range(len(text), 0, -1):
                token = self.vocab.by_bytes.get(text[:n])
                if token is not None and token < allowed.numel() and allowed[token]:
                    forced[token] = True
                    return forced
        return allowed

    def _follow(self, data: bytes) -> None:
        """Feed generated bytes to the JSON closer, past the text the grammar writes before the value."""
        if self._before_left:
            n = min(len(data), len(self._before_left))
            if data[:n] != self._before_left[:n]:
                self._closer.broken = True
            self._before_left, data = self._before_left[n:], data[n:]
        self._closer.feed(data)

    def _closing_suffix(self) -> bytes | None:
        """What completes the output: close the JSON value, then write the text after it."""
        after = self.json_between[1]
        if self._before_left:
            return None
        suffix = self._closer.suffix()
        if suffix is None:
            return None
        if suffix:
            return suffix + after
        written = self._closer.after_value  # the value is complete; `after` may have begun
        return after[len(written):] if after.startswith(written) else None

    def allowed(self, size: int) -> Tensor:
        """(size,) bool: the tokens the grammar allows next (ids past the tokenizer's vocabulary never)."""
        # numpy: a handful of small-tensor torch ops per token cost more than the mask itself.
        m = self.matcher
        allowed = np.zeros(size, dtype=bool)
        if m.is_error():  # a token the grammar refused (cannot happen while the mask is applied): end
            log.warning("grammar matcher failed: %s", _one_line(m.get_error()))
        else:
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            n = min(size, self.vocab.vocab_size)
            allowed[:n] = bits[:n]
        stops = [i for i in self.stop_ids if i < size]
        allowed[stops] = m.is_error() or m.is_accepting()
        if not allowed.any():  # nothing can follow: end rather than sample from nothing
            allowed[stops] = True
        return torch.from_numpy(allowed)

    @property
    def accepting(self) -> bool:
        return not self.matcher.is_error() and self.matcher.is_accepting()


def json_closing(text: bytes) -> bytes | None:
    """The shortest bytes that make `text`, the start of one JSON value, a complete value (see
    JsonCloser); None when `text` is not the start of a JSON value."""
    closer = JsonCloser()
    closer.feed(text)
    return None if closer.after_value.strip() else closer.suffix()


class JsonCloser:
    """Follows one JSON value as its bytes are written and knows the shortest way to complete it:
    close the open string (finishing an escape), complete a number or literal, give a pending key a
    null value, close every open array and object. Fed incrementally, so each byte is read once.
    Strings are bytes here, never validated as UTF-8 (the grammar does that)."""

    def __init__(self):
        # [kind, state]: ("obj", key0|key|colon|value|next), ("arr", value0|value|next)
        self.stack: list[list[str]] = []
        self.started = self.done = self.broken = False
        self.in_string = self.is_key = False
        self.escape: int | None = None  # None; -1: after a backslash; 0..3: hex digits of a \u escape seen
        self.atom = b""  # a number or literal being written
        self.after_value = b""  # bytes after the complete value

    def _value_done(self) -> None:
        if self.stack:
            self.stack[-1][1] = "next"
        else:
            self.done = True

    def _end_atom(self) -> bool:
        if not self.atom:
            return True
        if self.atom in (b"true", b"false", b"null") or _complete_number(self.atom):
            self.atom = b""
            self._value_done()
            return True
        return False

    def feed(self, data: bytes) -> None:
        for i, ch in enumerate(data):
            if self.broken:
                return
            if self.done and not self.atom:
                self.after_value += data[i:]
                return
            self._byte(bytes([ch]))

    def _byte(self, c: bytes) -> None:
        if self.in_string:
            if self.escape == -1:
                self.escape = 0 if c == b"u" else None
            elif self.escape is not None:
                self.escape = None if self.escape == 3 else self.escape + 1
            elif c == b"\\":
                self.escape = -1
            elif c == b'"':
                self.in_string = False
                if self.is_key:
                    self.stack[-1][1] = "colon"
                else:
                    self._value_done()
            return
        if self.atom and (c.isalnum() or c in b"+-."):
            self.atom += c
            return
        if not self._end_atom():
            self.broken = True
            return
        if c in b" \t\r\n":
            return
        if self.done:
            self.after_value += c
            return
        stack = self.stack
        state = stack[-1][1] if stack else ("value" if not self.started else "")
        self.started = True
        if c in b"{[" and state in ("value", "value0"):
            stack.append(["obj", "key0"] if c == b"{" else ["arr", "value0"])
        elif c == b'"' and state in ("key0", "key", "value", "value0"):
            self.is_key, self.in_string = state in ("key0", "key"), True
        elif c == b":" and state == "colon":
            stack[-1][1] = "value"
        elif c == b"," and state == "next":
            stack[-1][1] = "key" if stack[-1][0] == "obj" else "value"
        elif c in b"}]" and stack and stack[-1][0] == ("obj" if c == b"}" else "arr") \
                and state in ("key0", "value0", "next"):
            stack.pop()
            self._value_done()
        elif (c.isalnum() or c == b"-") and state in ("value", "value0"):
            self.atom = c
        else:
            self.broken = True

    def suffix(self) -> bytes | None:
        """The bytes that complete the value (b"" when it is complete); None when what was fed is
        not the start of a JSON value."""
        if self.broken:
            return None
        if self.done and not self.atom:
            return b""
        if not self.started:
            return b"{}"
        out, states = b"", [f[1] for f in self.stack]
        inner_done = False  # the innermost open thing (string, atom) is closed by `out`
        if self.in_string:
            if self.escape == -1:
                out += b"n"
            elif self.escape is not None:
                out += b"0" * (4 - self.escape)
            out += b'"'
            if self.is_key:
                states[-1] = "colon"
            else:
                inner_done = True
        elif self.atom:
            for literal in (b"true", b"false", b"null"):
                if literal.startswith(self.atom):
                    out += literal[len(self.atom):]
                    break
            else:
                if not _complete_number(self.atom):
                    if not _complete_number(self.atom + b"0"):
                        return None
                    out += b"0"
            inner_done = True
        if inner_done and states:
            states[-1] = "next"
        for depth, (kind, _) in enumerate(reversed(self.stack)):
            state = states[len(states) - 1 - depth] if depth == 0 else "next"  # outer ones hold a value
            if kind == "obj":
                out += {"key0": b"}", "key": b'"":null}', "colon": b":null}", "value": b"null}", "next": b"}"}[state]
            else:
                out += {"value0": b"]", "value": b"null]", "next": b"]"}[state]
        return out


def _complete_number(atom: bytes) -> bool:
    try:
        json.loads(atom)
    except ValueError:
        return False
    return not atom.startswith((b"true", b"false", b"null"))
