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
        raise GrammarError(_first_line(messages[0]))


def _first_line(message: str) -> str:
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
    A closing that the grammar refuses (a schema's required keys) is not forced."""

    # Tokens kept in reserve beyond the closing bytes: a multi-byte character cut inside a string
    # must be completed before the string can close.
    CLOSE_SLACK = 4

    def __init__(self, vocab: GrammarVocabulary, grammar: str, stop_ids: frozenset[int], *,
                 budget: int | None = None, close_json: bool = False, json_between: tuple[bytes, bytes] = (b"", b"")):
        """`json_between`: the text the grammar puts before and after the JSON value (a tool call's
        tags), for closing it in time."""
        self.matcher = _llguidance().LLMatcher(vocab.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_first_line(self.matcher.get_error()))
        self.vocab = vocab
        self.stop_ids = sorted(stop_ids)
        self.budget, self.close_json, self.json_between = budget, close_json, json_between
        self._consumed = 0
        self._text = bytearray()
        self._closing_now = False

    def __call__(self, generated: Sequence[int], logits: Tensor) -> Tensor:
        for token in generated[self._consumed :]:
            if token not in self.stop_ids:
                self.matcher.consume_token(int(token))
                self._text += self.vocab.spelled[token] or b"" if token < self.vocab.vocab_size else b""
        self._consumed = len(generated)
        allowed = self.allowed(logits.size(-1))
        if self.close_json and self.budget is not None:
            allowed = self._closing(allowed, self.budget - len(generated))
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

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
        for n in range(len(suffix), 0, -1):
            token = self.vocab.by_bytes.get(suffix[:n])
            if token is not None and token < allowed.numel() and allowed[token]:
                forced[token] = True
                return forced
        return allowed

    def _closing_suffix(self) -> bytes | None:
        """What completes the output: close the JSON value, then write the text after it."""
        before, after = self.json_between
        text = bytes(self._text)
        if not text.startswith(before):
            return None
        body = text[len(before):]
        for k in range(min(len(after), len(body)), 0, -1):  # the value done, `after` begun
            if body.endswith(after[:k]) and json_closing(body[:-k]) == b"":
                return after[k:]
        suffix = json_closing(body)
        return None if suffix is None else suffix + after

    def allowed(self, size: int) -> Tensor:
        """(size,) bool: the tokens the grammar allows next (ids past the tokenizer's vocabulary never)."""
        m = self.matcher
        if m.is_error():  # a token the grammar refused (cannot happen while the mask is applied): end
            log.warning("grammar matcher failed: %s", _first_line(m.get_error()))
            allowed = torch.zeros(size, dtype=torch.bool)
        else:
            packed = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.uint8)
            bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1  # little-endian bits
            allowed = torch.zeros(size, dtype=torch.bool)
            n = min(size, self.vocab.vocab_size)
            allowed[:n] = bits.flatten()[:n].bool()
        stops = [i for i in self.stop_ids if i < size]
        done = m.is_error() or m.is_accepting()
        allowed[stops] = done
        if not allowed.any():  # nothing can follow: end rather than sample from nothing
            allowed[stops] = True
        return allowed

    @property
    def accepting(self) -> bool:
        return not self.matcher.is_error() and self.matcher.is_accepting()


def json_closing(text: bytes) -> bytes | None:
    """The shortest bytes that make `text`, the start of one JSON value, a complete value: close the
    open string (finishing an escape), complete a number or literal, give a pending key a null value,
    close every open array and object. None when `text` is not the start of a JSON value. Used to
    close a constrained output in time, so strings here are bytes and never validated as UTF-8."""
    stack: list[list[str]] = []  # [kind, state]: ("obj", key0|key|colon|value|next) ("arr", value0|value|next)
    done = started = False
    in_string = is_key = False
    escape: int | None = None  # None; -1: after a backslash; 0..3: hex digits of a \u escape seen
    atom = b""  # a number or literal being written

    def value_done() -> None:
        nonlocal done
        if not stack:
            done = True
        elif stack[-1][0] == "obj":
            stack[-1][1] = "next"
        else:
            stack[-1][1] = "next"

    def end_atom() -> bool:
        nonlocal atom
        if not atom:
            return True
        if atom in (b"true", b"false", b"null") or _complete_number(atom):
            atom = b""
            value_done()
            return True
        return False

    for ch in text:
        c = bytes([ch])
        if in_string:
            if escape == -1:
                escape = 0 if c == b"u" else None
            elif escape is not None:
                escape = None if escape == 3 else escape + 1
            elif c == b"\\":
                escape = -1
            elif c == b'"':
                in_string = False
                if is_key:
                    stack[-1][1] = "colon"
                else:
                    value_done()
            continue
        if atom and (c.isalnum() or c in b"+-."):
            atom += c
            continue
        if not end_atom():
            return None
        if c in b" \t\r\n":
            continue
        if done:
            return None
        state = stack[-1][1] if stack else ("value" if not started else "")
        started = True
        if c in b"{[":
            if state not in ("value", "value0"):
                return None
            stack.append(["obj", "key0"] if c == b"{" else ["arr", "value0"])
        elif c == b'"':
            is_key = state in ("key0", "key")
            if not is_key and state not in ("value", "value0"):
                return None
            in_string = True
        elif c == b":":
            if state != "colon":
                return None
            stack[-1][1] = "value"
        elif c == b",":
            if state != "next":
                return None
            stack[-1][1] = "key" if stack[-1][0] == "obj" else "value"
        elif c in b"}]":
            kind = "obj" if c == b"}" else "arr"
            if not stack or stack[-1][0] != kind or state not in ("key0", "value0", "next"):
                return None
            stack.pop()
            value_done()
        elif c.isalnum() or c == b"-":
            if state not in ("value", "value0"):
                return None
            atom = c
        else:
            return None
    out = b""
    if in_string:
        if escape == -1:
            out += b"n"
        elif escape is not None:
            out += b"0" * (4 - escape)
        out += b'"'
        if is_key:
            stack[-1][1] = "colon"
        else:
            value_done()
    elif atom:
        for literal in (b"true", b"false", b"null"):
            if literal.startswith(atom):
                out += literal[len(atom):]
                break
        else:
            if not _complete_number(atom):
                out += b"0"
                if not _complete_number(atom + b"0"):
                    return None
        value_done()
    if not started and not done:
        return b"{}"
    for depth, (kind, state) in enumerate(reversed(stack)):
        state = state if depth == 0 else "next"  # an outer container holds the inner one as a value
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
