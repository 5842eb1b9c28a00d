"""SentencePiece tokenizers (Llama 2 family, llama2.c's tok512.model) over the `sentencepiece` library."""
from __future__ import annotations

import os
from typing import Sequence

from torchchat.errors import TokenizerError
from torchchat.tokenizer.base import add_bos_eos, check_ids, special_pattern, split_special


class SentencePieceTokenizer:
    """A SentencePiece ModelProto (`tokenizer.model`) behind the Tokenizer protocol.

    Encoding follows the model's own normalizer spec (Llama 2: a dummy-prefix space, no whitespace
    folding), exactly as `sentencepiece` does it. Control pieces (`<s>`, `</s>`) decode to nothing,
    as in `sentencepiece`.
    """

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike[str]):
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except OSError as e:
            raise TokenizerError(f"cannot read SentencePiece tokenizer {path}: {e.strerror}; check the path") from e
        self._init(proto, source=path, add_bos=True)

    @classmethod
    def from_model_proto(
        cls,
        proto: bytes,
        *,
        source: str,
        kind: str = "sentencepiece",
        add_bos: bool = True,
        bos_id: int | None,
        eos_id: int | None,
    ) -> "SentencePieceTokenizer":
        """Build from serialized ModelProto bytes (e.g. made from GGUF metadata); `source` names them
        in error messages, `kind` is what the tokenizer reports (the GGUF loader says "gguf"), and
        `bos_id` / `eos_id` (None: there is none) override what sentencepiece derives from the proto."""
        tok = cls.__new__(cls)
        tok.kind = kind
        tok._init(proto, source=source, add_bos=add_bos)
        tok.bos_id, tok.eos_id = bos_id, eos_id
        return tok

    def _init(self, proto: bytes, *, source: str, add_bos: bool) -> None:
        import sentencepiece

        self.source = source
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, UnicodeDecodeError) as e:  # the latter: its error message quotes bad bytes
            raise TokenizerError(
                f"{source} is not a valid SentencePiece model ({str(e).strip().splitlines()[0][:160]}); "
                "pass the tokenizer.model that came with the checkpoint"
            ) from e
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int | None = _id_or_none(self._sp.bos_id())
        self.eos_id: int | None = _id_or_none(self._sp.eos_id())
        # Whether prompts for this model start with BOS (Llama 2's do; a GGUF may say otherwise).
        self.add_bos = add_bos
        self.chat_template: str | None = None
        sp = self._sp
        try:
            # Every piece is decoded once here: a damaged model whose piece is not UTF-8 fails now, in
            # one line, instead of with a UnicodeDecodeError in the middle of a generation.
            pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
        except UnicodeDecodeError as e:
            raise TokenizerError(
                f"{source}: a piece of the SentencePiece model is not valid UTF-8 ({e.reason} at byte {e.start}); the "
                "file is damaged, pass the tokenizer.model that came with the checkpoint"
            ) from e
        self._specials = {pieces[i]: i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        # sentencepiece never matches control pieces in text; allow_special splits the text on them.
        self._control_re = special_pattern(p for p, i in self._specials.items() if sp.is_control(i))

    def serialized_model_proto(self) -> bytes:
        """The ModelProto this tokenizer runs, as a `tokenizer.model` file holds it."""
        return self._sp.serialized_model_proto()

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset() if self.eos_id is None else frozenset({self.eos_id})

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids. With `allow_special`, control-piece text ("</s>") becomes its id and each text
        fragment between them is encoded on its own, with its own dummy prefix (as llama.cpp does)."""
        if not allow_special:
            return add_bos_eos(self, self._sp.encode(text), bos, eos)
        ids: list[int] = []
        for fragment, special in split_special(text, self._control_re, self._specials):
            if special is None:
                ids += self._sp.encode(fragment)
            else:
                ids.append(special)
        return add_bos_eos(self, ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        check_ids(ids, self.vocab_size, self.source)
        return self._sp.decode(ids)

    def special_id(self, text: str) -> int | None:
        return self._specials.get(text)

    def token_bytes(self) -> list[bytes | None]:
        sp, out = self._sp, []
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                out.append(None)
            elif sp.is_byte(i):  # "<0x0A>"
                out.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                out.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else i
