"""TiktokenTokenizer (Llama 3) against llama.cpp's Llama 3 test vectors."""
from __future__ import annotations

import pytest

from torchchat.errors import TokenizerError


def test_once_upon_a_time(llama3_tok):
    assert llama3_tok.encode("Once upon a time") == [12805, 5304, 264, 892]
    assert llama3_tok.encode("Once upon a time", bos=True, eos=True) == [128000, 12805, 5304, 264, 892, 128001]


def test_llama_cpp_bpe_vectors(llama3_tok, bpe_cases):
    """llama.cpp's expected ids for Llama 3 carry no BOS (the test tokenizes with add_special=false)."""
    for text, expected in bpe_cases:
        assert llama3_tok.encode(text) == expected, text


def test_bpe_vectors_round_trip(llama3_tok, bpe_cases):
    """Byte-level BPE is lossless: every case decodes back exactly."""
    for text, expected in bpe_cases:
        assert llama3_tok.decode(expected) == text


def test_special_tokens_follow_llama_3_1(llama3_tok):
    # Ids Llama 3.1's prompt format and stop rules depend on (Meta's model card).
    named = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_2|>": 128005,
        "<|reserved_special_token_3|>": 128011,
        "<|reserved_special_token_247|>": 128255,
    }
    for text, token_id in named.items():
        assert llama3_tok.special_id(text) == token_id
        assert llama3_tok.decode([token_id]) == text
    assert llama3_tok.vocab_size == 128256
    assert (llama3_tok.bos_id, llama3_tok.eos_id) == (128000, 128001)
    assert llama3_tok.stop_ids == frozenset({128001, 128008, 128009})
    assert llama3_tok.special_id("<|reserved_special_token_248|>") is None


def test_special_text_is_plain_unless_allowed(llama3_tok):
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    plain = llama3_tok.encode(text)
    assert max(plain) < 128000
    assert llama3_tok.decode(plain) == text
    assert llama3_tok.encode(text, allow_special=True) == (
        [128006] + llama3_tok.encode("user") + [128007] + llama3_tok.encode("\n\nHi") + [128009]
    )


@pytest.mark.parametrize("text", [" " * 600_000, "x" + " " * 300_000 + "y", "ab" * 200_000 + "\n" * 60_000])
def test_very_long_runs(llama3_tok, text):
    """tiktoken's regex gives up on whitespace runs of a few hundred thousand characters; those runs are
    cut into pieces, and the result still decodes to the input."""
    ids = llama3_tok.encode(text)
    assert llama3_tok.decode(ids) == text


def test_long_run_cut_leaves_ordinary_text_alone(llama3_tok):
    head, tail = "Hello world.", "  The end"
    ids = llama3_tok.encode(head + " " * 60_000 + tail)
    assert ids[:3] == llama3_tok.encode(head)
    assert ids[-2:] == llama3_tok.encode(" The end")[-2:]


def test_malformed_ranks_file(tmp_path):
    from torchchat.tokenizer.tiktoken import TiktokenTokenizer

    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot base64!! 1\n")
    with pytest.raises(TokenizerError, match="line 2"):
        TiktokenTokenizer(bad)
    bad.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(TokenizerError, match="numbered 0..n-1"):
        TiktokenTokenizer(bad)
