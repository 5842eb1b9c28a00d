"""Hugging Face `tokenizer.json` tokenizers over the `tokenizers` library, with the bits of
`tokenizer_config.json` (bos/eos tokens, chat template) that generation needs."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Sequence

from torchchat.errors import TokenizerError
from torchchat.tokenizer.base import add_bos_eos, check_ids

# End-of-text / end-of-turn tokens of the common chat formats: a generation stops on any of these that
# the vocabulary has as a special token, whatever the config names as eos (Llama 3 Instruct's
# tokenizer_config says <|end_of_text|> while its turns end with <|eot_id|>).
_END_TOKENS = (
    "</s>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "<eos>",
    "<|end|>",
)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class HFTokenizer:
    """A `tokenizer.json` behind the Tokenizer protocol.

    `path` is a tokenizer.json or a directory holding one. Beside it, `tokenizer_config.json` (bos/eos
    tokens, `add_bos_token`, `chat_template`), `chat_template.jinja` and `generation_config.json`
    (`eos_token_id`) are read when present. `encode` never applies the file's post-processor (which
    may add BOS): BOS/EOS are added only when asked, so every tokenizer kind behaves the same.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike[str]):
        import tokenizers

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        text = _read_text(file)
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}); the file is damaged") from e
        if not isinstance(spec, dict) or "model" not in spec:
            raise TokenizerError(
                f'{file} is JSON but not a tokenizer.json (no "model" key); pass the tokenizer.json file '
                "(tokenizer_config.json only configures it)"
            )
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises plain Exception for a bad spec
            raise TokenizerError(
                f"{file} cannot be loaded by `tokenizers` ({str(e)[:160]}); the file is damaged"
            ) from e

        folder = file.parent
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        template_file = folder / "chat_template.jinja"
        chat_template = _read_text(template_file) if template_file.is_file() else _config_template(config)
        template_bos = _post_processor_bos(spec.get("post_processor"))
        bos_token = _token_text(config.get("bos_token")) or template_bos
        add_bos = config.get("add_bos_token")
        extra_stops = generation.get("eos_token_id")
        extra_stops = extra_stops if isinstance(extra_stops, list) else [extra_stops]
        self._init(
            tok,
            source=str(file),
            bos_token=bos_token,
            eos_token=_token_text(config.get("eos_token")),
            add_bos=bool(template_bos) if add_bos is None else bool(add_bos),
            chat_template=chat_template,
            extra_stop_ids=[i for i in extra_stops if isinstance(i, int)],
            byte_fallback="ByteFallback" in json.dumps(spec.get("decoder")),
        )

    @classmethod
    def from_tokenizer(
        cls,
        tok: Any,
        *,
        source: str,
        kind: str = "hf",
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
    ) -> "HFTokenizer":
        """Wrap an in-memory byte-level `tokenizers.Tokenizer` (e.g. built from GGUF metadata)."""
        self = cls.__new__(cls)
        self.kind = kind
        self._init(
            tok,
            source=source,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos=add_bos,
            chat_template=chat_template,
            extra_stop_ids=extra_stop_ids,
            byte_fallback=False,
        )
        return self

    def _init(
        self,
        tok: Any,
        *,
        source: str,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        chat_template: str | None,
        extra_stop_ids: Sequence[int],
        byte_fallback: bool,
    ) -> None:
        self._tok = tok
        # `encode_special_tokens` is a flag on the shared Tokenizer: set it and encode under one lock.
        self._lock = threading.Lock()
        self.source = source
        # One past the highest id (ids need not be contiguous), so check_vocab compares with embedding rows.
        self.vocab_size: int = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        if eos_token is None:
            eos_token = next((t for t in _END_TOKENS if t in specials), None)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = self._token_id(bos_token, "bos_token")
        self.eos_id = self._token_id(eos_token, "eos_token")
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = chat_template
        stops = {self._added[t] for t in _END_TOKENS if t in specials}
        stops.update(int(i) for i in extra_stop_ids)
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self._stop_ids = frozenset(stops)
        # A ByteFallback decoder decodes each run of <0xNN> tokens as a whole and turns the entire run
        # into U+FFFD if it is not valid UTF-8, so a streamed run's text is known only once it ends.
        self.holdback_ids: frozenset[int] = (
            frozenset(i for t, i in tok.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))
            if byte_fallback
            else frozenset()
        )

    def _token_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(
                f"{self.source}: {what} {token!r} is not in the vocabulary; the tokenizer files disagree"
            )
        return token_id

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        with self._lock:
            self._tok.encode_special_tokens = not allow_special
            ids = self._tok.encode(text, add_special_tokens=False).ids
        return add_bos_eos(self, ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        check_ids(ids, self.vocab_size, self.source)
        return self._tok.decode(ids, skip_special_tokens=False)

    def special_id(self, text: str) -> int | None:
        return self._added.get(text)

    def token_bytes(self) -> list[bytes | None]:
        """Spelled from the vocabulary by the decoder's kind: byte-level BPE (GPT-2's alphabet, one
        character per byte) or SentencePiece-style ("▁" for a space, "<0xNN>" byte pieces). Added
        tokens that are not special (Qwen's "<tool_call>") are their text."""
        decoder = self._tok.decoder
        spec = decoder.__getstate__().decode("utf-8", "replace") if decoder is not None else ""
        byte_level = '"ByteLevel"' in spec
        unbyte = {c: b for b, c in _gpt2_byte_chars().items()}
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if not t.special}
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or i in specials:
                out.append(None)
            elif i in added:
                out.append(added[i].encode("utf-8"))
            elif byte_level:
                out.append(bytes(unbyte[c] for c in piece) if all(c in unbyte for c in piece) else piece.encode())
            elif _BYTE_TOKEN.fullmatch(piece):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out


def _gpt2_byte_chars() -> dict[int, str]:
    """Byte-level BPE's alphabet (GPT-2): printable Latin-1 bytes are their own character, the other
    bytes the characters from U+0100 on, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return chars


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}; check the path") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text; pass a tokenizer.json") from e


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file beside tokenizer.json: {} when absent, an error when malformed."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or remove it") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object; fix or remove it")
    return value


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token as "text" or as {"content": "text", ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_template(config: dict[str, Any]) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is the chat one."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _post_processor_bos(processor: Any) -> str | None:
    """The special token a TemplateProcessing post-processor puts first (Llama's BOS), if any."""
    if not isinstance(processor, dict):
        return None
    if processor.get("type") == "Sequence":
        for p in processor.get("processors", []):
            found = _post_processor_bos(p)
            if found:
                return found
        return None
    if processor.get("type") == "TemplateProcessing":
        single = processor.get("single") or [{}]
        first = single[0].get("SpecialToken") if isinstance(single[0], dict) else None
        if isinstance(first, dict) and isinstance(first.get("id"), str):
            return first["id"]
    return None
