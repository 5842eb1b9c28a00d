"""load_tokenizer picks the kind from the content; bad paths give one clear TokenizerError."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import shared_path
from torchchat.errors import TokenizerError
from torchchat.tokenizer.load import check_vocab, identify_tokenizer, load_tokenizer


def _copy(src, dst):
    shutil.copy(src, dst)
    return dst


def test_kinds_from_content_not_names(tmp_path, llama2_model_path, llama3_model_path, stories260k_dir, llama2_hf_dir):
    # Misleading names on purpose: only the bytes decide.
    cases = {
        "sentencepiece": _copy(llama2_model_path, tmp_path / "vocab.json"),
        "tiktoken": _copy(llama3_model_path, tmp_path / "sp.model"),
        "hf": _copy(llama2_hf_dir / "tokenizer.json", tmp_path / "tokenizer.model"),
        "gguf": _copy(stories260k_dir / "stories260K.gguf", tmp_path / "weights.bin"),
    }
    for kind, path in cases.items():
        assert identify_tokenizer(path) == (kind, path)
    tok = load_tokenizer(cases["tiktoken"])
    assert tok.kind == "tiktoken" and tok.encode("Once upon a time") == [12805, 5304, 264, 892]
    tok = load_tokenizer(cases["sentencepiece"])
    assert tok.kind == "sentencepiece" and tok.encode("Once upon a time") == [9038, 2501, 263, 931]
    tok = load_tokenizer(cases["hf"])
    assert tok.kind == "hf" and tok.encode("Once upon a time") == [9038, 2501, 263, 931]
    tok = load_tokenizer(cases["gguf"])
    assert tok.kind == "gguf" and tok.encode("Once upon a time") == [403, 407, 261, 378]


def test_tok512_and_directories(tmp_path, stories260k_dir, llama2_hf_dir, llama3_model_path):
    assert load_tokenizer(stories260k_dir / "tok512.model").vocab_size == 512
    # A folder: tokenizer.json wins over tokenizer.model.
    assert identify_tokenizer(llama2_hf_dir) == ("hf", llama2_hf_dir / "tokenizer.json")
    _copy(llama3_model_path, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).kind == "tiktoken"


@pytest.mark.parametrize(
    "content, message",
    [
        (os.urandom(4096), "not a tokenizer this program knows"),
        (b"", "is empty"),
        (b"\x0a\x00\x0a", "not a tokenizer this program knows"),
    ],
)
def test_unknown_files(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "tiktoken" in str(e.value) and "GGUF" in str(e.value)


def test_llama2c_tokenizer_bin_is_refused_with_a_hint():
    path = shared_path("models", "stories260K", "tok512.bin")
    with pytest.raises(TokenizerError, match="tokenizer.bin is not"):
        load_tokenizer(path)


def test_missing_paths(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)


def test_check_vocab(llama2_tok, tok512):
    with pytest.raises(TokenizerError, match=r"32000 tokens.*only 512"):
        check_vocab(llama2_tok, 512)
    check_vocab(llama2_tok, 32000)
    check_vocab(tok512, 512)
    check_vocab(tok512, 576)  # a padded embedding table is fine
