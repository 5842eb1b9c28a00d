"""SentencePieceTokenizer against llama.cpp's Llama 2 test vectors and the stories260K facts."""
from __future__ import annotations

import pytest

from torchchat.errors import TokenizerError
from torchchat.tokenizer.base import Tokenizer


def test_once_upon_a_time(tok512, llama2_tok):
    assert tok512.encode("Once upon a time") == [403, 407, 261, 378]
    assert llama2_tok.encode("Once upon a time") == [9038, 2501, 263, 931]
    assert llama2_tok.encode("Once upon a time", bos=True, eos=True) == [1, 9038, 2501, 263, 931, 2]


def test_protocol_fields(llama2_tok, tok512):
    assert isinstance(llama2_tok, Tokenizer)
    assert (llama2_tok.kind, llama2_tok.bos_id, llama2_tok.eos_id, llama2_tok.vocab_size) == (
        "sentencepiece",
        1,
        2,
        32000,
    )
    assert llama2_tok.stop_ids == frozenset({2})
    assert tok512.vocab_size == 512 and tok512.stop_ids == frozenset({2})


def test_llama_cpp_spm_vectors(llama2_tok, spm_cases):
    """llama.cpp's test-tokenizer-0 tokenizes without BOS (add_special=false); SentencePiece's dummy
    prefix gives the leading "▁" its ids show (" " -> 259 "▁▁", "\\t" -> 29871 "▁", 12)."""
    for text, expected in spm_cases:
        assert llama2_tok.encode(text) == expected, text


def test_spm_vectors_round_trip(llama2_tok, spm_cases):
    """Llama 2 has byte fallback and no normalization, so every case decodes back exactly; sentencepiece
    removes exactly the dummy-prefix space it added, so leading spaces survive too."""
    for text, expected in spm_cases:
        assert llama2_tok.decode(expected) == text


def test_special_text_is_plain_unless_allowed(llama2_tok):
    text = "<s>Hi</s>"
    plain = llama2_tok.encode(text)
    assert 1 not in plain and 2 not in plain
    assert llama2_tok.decode(plain) == text
    # Like llama.cpp with parse_special: each fragment after a special token gets its own dummy prefix.
    assert llama2_tok.encode(text, allow_special=True) == [1] + llama2_tok.encode("Hi") + [2]
    assert llama2_tok.special_id("</s>") == 2
    assert llama2_tok.special_id("<unk>") == 0
    assert llama2_tok.special_id("Hello") is None


def test_control_pieces_decode_to_nothing(llama2_tok):
    assert llama2_tok.decode([1, 15043, 2]) == "Hello"


def test_out_of_range_id_is_a_clear_error(tok512):
    with pytest.raises(TokenizerError, match="512"):
        tok512.decode([1, 600])


def test_damaged_model_file(tmp_path):
    from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer

    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\x05hello")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        SentencePieceTokenizer(bad)
    with pytest.raises(TokenizerError, match="cannot read"):
        SentencePieceTokenizer(tmp_path / "missing.model")
