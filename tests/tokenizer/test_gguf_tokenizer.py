"""Tokenizers rebuilt from GGUF metadata: llama.cpp's Llama 2 vocabulary file, stories260K.gguf, and
byte-level BPE GGUFs written here from the Llama 3 ranks."""
from __future__ import annotations

import base64

import pytest

from tests.tokenizer.conftest import write_bpe_gguf
from torchchat.errors import TokenizerError
from torchchat.tokenizer.gguf import tokenizer_from_gguf
from torchchat.tokenizer.tiktoken import TiktokenTokenizer, llama3_special_tokens, read_tiktoken_ranks


@pytest.fixture(scope="module")
def spm_gguf_tok(spm_gguf_reader):
    return tokenizer_from_gguf(spm_gguf_reader)


def test_spm_gguf_matches_llama_cpp(spm_gguf_tok, spm_cases):
    for text, expected in spm_cases:
        assert spm_gguf_tok.encode(text) == expected, text
        assert spm_gguf_tok.decode(expected) == text


def test_spm_gguf_fields(spm_gguf_tok):
    assert spm_gguf_tok.kind == "gguf"
    assert (spm_gguf_tok.bos_id, spm_gguf_tok.eos_id, spm_gguf_tok.vocab_size) == (1, 2, 32000)
    assert spm_gguf_tok.add_bos and spm_gguf_tok.stop_ids == frozenset({2})
    assert spm_gguf_tok.encode("</s>x", allow_special=True) == [2, 921]


def test_stories260k_gguf_from_path(stories260k_dir, tok512):
    tok = tokenizer_from_gguf(stories260k_dir / "stories260K.gguf")
    assert tok.encode("Once upon a time") == [403, 407, 261, 378]
    assert tok.vocab_size == 512
    ids = tok512.encode("Lily and Ben went to the park. \u00e9\U0001f600")
    assert tok.encode(tok512.decode(ids)) == ids and tok.decode(ids) == tok512.decode(ids)


@pytest.fixture(scope="module")
def small_llama3_ranks(tmp_path_factory, llama3_model_path):
    """The first 3000 Llama 3 ranks (all 256 bytes and the commonest merges): a complete BPE in itself,
    small enough that gguf's reader parses it in about a second."""
    ranks = {t: r for t, r in read_tiktoken_ranks(str(llama3_model_path)).items() if r < 3000}
    folder = tmp_path_factory.mktemp("small-llama3")
    lines = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    (folder / "tokenizer.model").write_text(lines)
    write_bpe_gguf(folder / "vocab.gguf", ranks, llama3_special_tokens(len(ranks)))
    return folder


def test_bpe_gguf_encodes_like_tiktoken(small_llama3_ranks, bpe_cases):
    reference = TiktokenTokenizer(small_llama3_ranks / "tokenizer.model")
    tok = tokenizer_from_gguf(small_llama3_ranks / "vocab.gguf")
    assert tok.kind == "gguf" and tok.vocab_size == reference.vocab_size == 3256
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (3000, 3001, True)
    assert tok.stop_ids == frozenset({3001, 3008, 3009})  # eos, <|eom_id|>, <|eot_id|>
    assert tok.chat_template == "{{ bos_token }}"
    texts = [t for t, _ in bpe_cases] + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]
    for text in texts:
        ids = reference.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
        assert tok.encode(text, allow_special=True) == reference.encode(text, allow_special=True)


@pytest.mark.slow
def test_full_llama3_bpe_gguf_matches_llama_cpp(tmp_path, llama3_model_path, bpe_cases):
    """The whole Llama 3 vocabulary (128256 tokens, 280147 merges) as a GGUF; gguf's reader takes
    tens of seconds for it, hence slow."""
    ranks = read_tiktoken_ranks(str(llama3_model_path))
    write_bpe_gguf(tmp_path / "llama3.gguf", ranks, llama3_special_tokens(len(ranks)))
    tok = tokenizer_from_gguf(tmp_path / "llama3.gguf")
    assert tok.vocab_size == 128256 and tok.stop_ids == frozenset({128001, 128008, 128009})
    for text, expected in bpe_cases:
        assert tok.encode(text) == expected, text


def test_unsupported_pre_tokenizer(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    write_bpe_gguf(tmp_path / "deepseek.gguf", ranks, llama3_special_tokens(256), pre="deepseek-llm")
    with pytest.raises(TokenizerError, match="'deepseek-llm' is not supported"):
        tokenizer_from_gguf(tmp_path / "deepseek.gguf")


def test_unsupported_model_and_missing_tokenizer(tmp_path):
    import gguf

    path = tmp_path / "t5.gguf"
    writer = gguf.GGUFWriter(str(path), arch="t5")
    writer.add_tokenizer_model("t5")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match="'t5' is not supported.*llama, gpt2"):
        tokenizer_from_gguf(path)

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        tokenizer_from_gguf(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(TokenizerError, match="not a readable GGUF"):
        tokenizer_from_gguf(path)
    with pytest.raises(TokenizerError, match="cannot read"):
        tokenizer_from_gguf(tmp_path / "missing.gguf")
