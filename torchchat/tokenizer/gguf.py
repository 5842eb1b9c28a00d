"""Tokenizers rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

- `tokenizer.ggml.model == "llama"` (SentencePiece: tokens, scores, token types) becomes a real
  SentencePiece ModelProto loaded by `sentencepiece`, so encoding is the library's own.
- `"gpt2"` (byte-level BPE: tokens, merges, `tokenizer.ggml.pre`) becomes a `tokenizers` BPE with the
  pre-tokenizer regex llama.cpp uses for that `pre` name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchchat.errors import MissingDependencyError, TokenizerError
from torchchat.tokenizer.base import Tokenizer
from torchchat.tokenizer.tiktoken import LLAMA3_PATTERN

# llama.cpp token types (gguf.TokenType); SentencePiece's ModelProto.SentencePiece.Type uses the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre names (as llama.cpp writes them) whose pre-tokenizer is Llama 3's regex.
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Other pre names -> the regexes llama.cpp splits with, applied one after the other (llama-vocab.cpp).
_BPE_PRE = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "gpt-2": (_GPT2_RE,),
    "smollm": (r"\p{N}", _GPT2_RE),
    "gpt-4o": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
}

_SUPPORTED_MODELS = ("llama", "gpt2")

_K = "tokenizer.ggml."


def tokenizer_from_gguf(source: str | os.PathLike[str] | Any) -> Tokenizer:
    """Build the tokenizer stored in a GGUF file's metadata.

    `source` is a path or an open `gguf.GGUFReader` (the weight loader passes its reader so the file
    is parsed once). The result reports kind "gguf"; `add_bos` and `chat_template` come from the
    metadata. Raises TokenizerError when the file has no tokenizer or one of an unsupported model.
    """
    reader, name = _open(source)
    fields = reader.fields
    model = _scalar(fields, _K + "model", name)
    if model is None:
        raise TokenizerError(
            f"{name} holds no tokenizer (no tokenizer.ggml.model); "
            "pass a tokenizer file (tokenizer.model or tokenizer.json) instead"
        )
    if model == "llama":
        return _sentencepiece_from_gguf(fields, name)
    if model == "gpt2":
        return _bpe_from_gguf(fields, name)
    raise TokenizerError(
        f"{name}: GGUF tokenizer model {model!r} is not supported (supported: {', '.join(_SUPPORTED_MODELS)}); "
        "pass the model's own tokenizer file (tokenizer.model or tokenizer.json) instead"
    )


def _check_types(types: list[Any], name: str) -> None:
    """Token types are llama.cpp's 1..6; anything else (protobuf refuses it as an enum) is damage."""
    bad = next((t for t in types if not isinstance(t, int) or not _NORMAL <= t <= _BYTE), None)
    if bad is not None:
        raise TokenizerError(f"{name}: token type {bad!r} is not one of llama.cpp's (1..6); the file is damaged")


def _open(source: Any) -> tuple[Any, str]:
    try:
        import gguf
    except ImportError as e:
        raise MissingDependencyError("reading GGUF files needs the gguf package: pip install gguf==0.19.0") from e
    if isinstance(source, gguf.GGUFReader):
        return source, "GGUF file"
    path = os.fspath(source)
    from torchchat.checkpoint.gguf_header import check_gguf
    from torchchat.errors import CheckpointError

    try:
        check_gguf(Path(path))  # bounded header walk: GGUFReader trusts every length it reads
    except CheckpointError as e:
        raise TokenizerError(f"not a readable GGUF file: {e}") from e
    try:
        return gguf.GGUFReader(path), path
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror}; check the path") from e
    except (ValueError, IndexError, TypeError) as e:  # bad magic, truncated or corrupt metadata
        raise TokenizerError(f"{path} is not a readable GGUF file ({str(e)[:120]}); the file is damaged") from e


def _scalar(fields: dict[str, Any], key: str, name: str) -> Any:
    field = fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{name}: metadata {key} is not UTF-8; the file is damaged") from e


def _array(fields: dict[str, Any], key: str, name: str, *, required: bool = True) -> list[Any] | None:
    value = _scalar(fields, key, name)
    if value is None and required:
        raise TokenizerError(f"{name}: tokenizer metadata lacks {key}; the GGUF file is incomplete")
    return value


def _token_id(fields: dict[str, Any], key: str, name: str, n_tokens: int) -> int | None:
    value = _scalar(fields, _K + key, name)
    if value is None or not 0 <= int(value) < n_tokens:  # llama.cpp writes 2**32-1 (or -1) for "none"
        return None
    return int(value)


def _sentencepiece_from_gguf(fields: dict[str, Any], name: str) -> Tokenizer:
    from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer

    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # the generated module imports google.protobuf
        raise MissingDependencyError(
            "building a SentencePiece model from GGUF needs protobuf: pip install protobuf==7.36.2"
        ) from e

    tokens = _array(fields, _K + "tokens", name)
    scores = _array(fields, _K + "scores", name)
    types = _array(fields, _K + "token_type", name, required=False) or [_NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise TokenizerError(
            f"{name}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token types; the file is damaged"
        )
    _check_types(types, name)
    n = len(tokens)
    unk = _token_id(fields, "unknown_token_id", name, n)
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    if unk is None:
        raise TokenizerError(f"{name}: the SentencePiece vocabulary has no unknown token; the file is damaged")

    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        # sentencepiece insists on exactly one UNKNOWN piece: the one the metadata names.
        kind = _UNKNOWN if i == unk else (_CONTROL if kind == _UNKNOWN else kind)
        proto.pieces.add(piece=piece, score=float(score), type=kind)
    trainer = proto.trainer_spec
    # llama.cpp's SPM tokenizer merges the adjacent pair whose result has the highest score: that is
    # SentencePiece's BPE model (Llama 2 is one).
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = _BYTE in types
    trainer.unk_id = unk
    trainer.unk_piece = tokens[unk]
    bos = _token_id(fields, "bos_token_id", name, n)
    eos = _token_id(fields, "eos_token_id", name, n)
    for role, token_id in (("bos", bos), ("eos", eos)):
        setattr(trainer, f"{role}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(trainer, f"{role}_piece", tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    add_prefix = _scalar(fields, _K + "add_space_prefix", name)
    normalizer.add_dummy_prefix = True if add_prefix is None else bool(add_prefix)
    normalizer.remove_extra_whitespaces = bool(_scalar(fields, _K + "remove_extra_whitespaces", name) or False)
    normalizer.escape_whitespaces = True

    add_bos = _scalar(fields, _K + "add_bos_token", name)
    tok = SentencePieceTokenizer.from_model_proto(
        proto.SerializeToString(),
        source=name,
        kind="gguf",
        add_bos=bos is not None if add_bos is None else bool(add_bos),
        bos_id=bos,
        eos_id=eos,
    )
    tok.chat_template = _scalar(fields, "tokenizer.chat_template", name)
    return tok


def _bpe_from_gguf(fields: dict[str, Any], name: str) -> Tokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer as HFTok, decoders, models, pre_tokenizers

    from torchchat.tokenizer.hf import HFTokenizer

    pre = _scalar(fields, _K + "pre", name)
    if pre not in _LLAMA3_PRE and pre not in _BPE_PRE:
        raise TokenizerError(
            f"{name}: GGUF BPE pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join((*_LLAMA3_PRE, *_BPE_PRE))}); pass the model's tokenizer.json instead"
        )
    regexes = (LLAMA3_PATTERN,) if pre in _LLAMA3_PRE else _BPE_PRE[pre]
    tokens = _array(fields, _K + "tokens", name)
    merges = _array(fields, _K + "merges", name)
    types = _array(fields, _K + "token_type", name, required=False) or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{name}: {len(tokens)} tokens but {len(types)} token types; the file is damaged")
    _check_types(types, name)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{name}: the BPE vocabulary repeats a token; the file is damaged")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")  # byte-level tokens never hold a plain space (it is "Ġ")
        if not sep:
            raise TokenizerError(f"{name}: BPE merge {m!r} is not two tokens separated by a space; the file is damaged")
        pairs.append((left, right))

    # ignore_merges (Llama 3 only, as in llama.cpp): a pre-token that is itself in the vocabulary is
    # taken whole, as tiktoken does.
    tok = HFTok(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_PRE, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|eot_id|>) are specials; user-defined ones are matched in text as they are.
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )

    n = len(tokens)
    bos = _token_id(fields, "bos_token_id", name, n)
    eos = _token_id(fields, "eos_token_id", name, n)
    add_bos = _scalar(fields, _K + "add_bos_token", name)
    extra_stops = [
        i for i in (_token_id(fields, k, name, n) for k in ("eot_token_id", "eom_token_id")) if i is not None
    ]
    return HFTokenizer.from_tokenizer(
        tok,
        source=name,
        kind="gguf",
        bos_token=None if bos is None else tokens[bos],
        eos_token=None if eos is None else tokens[eos],
        add_bos=bos is not None if add_bos is None else bool(add_bos),
        chat_template=_scalar(fields, "tokenizer.chat_template", name),
        extra_stop_ids=extra_stops,
    )
