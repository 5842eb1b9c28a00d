"""StreamDecoder: the streamed pieces always add up to decode(all ids), for every tokenizer kind."""
from __future__ import annotations

import random

import pytest

from torchchat.tokenizer.stream import StreamDecoder

KINDS = ["tok512", "llama2_tok", "llama3_tok", "llama2_hf", "llama3_hf"]


def _stream(tok, ids):
    decoder = StreamDecoder(tok)
    pieces = [decoder.add(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


def _sequences(tok, texts, seed):
    """The texts encoded (half of them with BOS), then random ids: anywhere in the vocabulary, and
    among the first 300 ids (SentencePiece's byte pieces and control tokens live there)."""
    rng = random.Random(seed)
    seqs = [tok.encode(t, bos=i % 2 == 1) for i, t in enumerate(texts)]
    for high in (tok.vocab_size, 300):
        seqs += [[rng.randrange(high) for _ in range(rng.randrange(1, 40))] for _ in range(150)]
    return seqs


@pytest.mark.parametrize("kind", KINDS)
def test_stream_equals_decode(request, kind, spm_cases):
    tok = request.getfixturevalue(kind)
    texts = [t for t, _ in spm_cases]
    for ids in _sequences(tok, texts, seed=len(kind)):
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


@pytest.mark.parametrize("kind", ["llama2_tok", "llama3_tok", "llama2_hf"])
def test_no_broken_characters_and_spacing(request, kind):
    tok = request.getfixturevalue(kind)
    text = "Hello world! 🦙 нещо 我想在apple工作 ✅ 😶‍🌫️ done"
    pieces = _stream(tok, tok.encode(text))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # Emoji split over byte tokens come out whole, in one piece.
    assert any("🦙" in p for p in pieces)
    if kind != "llama3_tok":
        # SentencePiece pieces: the words after the first keep their leading space.
        assert " world" in pieces


def test_incomplete_tail_is_flushed_as_replacement(llama3_tok):
    ids = llama3_tok.encode("ok 🦙")
    decoder = StreamDecoder(llama3_tok)
    streamed = "".join(decoder.add(i) for i in ids[:-1])
    assert "\ufffd" not in streamed
    assert streamed + decoder.flush() == llama3_tok.decode(ids[:-1])
    # After a flush the decoder starts afresh.
    assert "".join(decoder.add(i) for i in llama3_tok.encode("again")) + decoder.flush() == "again"


def test_window_stays_small(llama2_tok):
    decoder = StreamDecoder(llama2_tok)
    for i in llama2_tok.encode("word " * 2000):
        decoder.add(i)
        assert len(decoder._window) <= 2


def _stream_with_prefix(tok, prompt, ids):
    decoder = StreamDecoder(tok, prefix=prompt)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("kind", ["llama2_tok", "llama3_tok", "llama2_hf"])
def test_prompt_prefix_gives_the_first_token_its_space(request, kind, spm_cases):
    tok = request.getfixturevalue(kind)
    prompt, generated = tok.encode("Hello", bos=True), tok.encode("Hello world")[1:]
    decoder = StreamDecoder(tok, prefix=prompt)
    assert decoder.add(generated[0]) == " world"
    rng = random.Random(7)
    for text, _ in spm_cases:
        ids = tok.encode(text, bos=True)
        cut = rng.randrange(len(ids) + 1)
        prompt, generated = ids[:cut], ids[cut:]
        streamed = "".join(_stream_with_prefix(tok, prompt, generated))
        assert tok.decode(prompt) + streamed == tok.decode(ids), text
