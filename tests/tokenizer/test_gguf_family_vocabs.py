"""GGUF byte-level BPE vocabularies of Llama's relatives against llama.cpp's own tokenizer test vectors
(models/ggml-vocab-NAME.gguf with .inp/.out in llama.cpp's source tree): the Qwen2 pre-tokenizer and GPT-2's.
Skipped where that tree is absent (TORCHCHAT_LLAMACPP, default ../llamacpp beside the project)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from torchchat.tokenizer.gguf import tokenizer_from_gguf  # noqa: E402

MODELS = Path(os.environ.get("TORCHCHAT_LLAMACPP", Path(__file__).resolve().parents[3] / "llamacpp")) / "src" / "models"
SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.mark.parametrize("name", ["qwen2", "gpt-2"])
def test_encode_matches_llama_cpp_vectors(name):
    vocab = MODELS / f"ggml-vocab-{name}.gguf"
    if not vocab.is_file():
        pytest.skip(f"llama.cpp's vocab tests not found at {MODELS}")
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    lines = vocab.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    tok = tokenizer_from_gguf(vocab)
    assert len(texts) > 40
    for text, line in zip(texts, lines):
        assert tok.encode(text) == [int(t) for t in line.split()], text
        assert tok.decode(tok.encode(text)) == text
