"""The C++ tokenizers (through cmake-out/tokenizer_test) against llama.cpp's 46 test vectors for the
Llama 2 SentencePiece and Llama 3 tiktoken vocabularies, in both directions."""
from __future__ import annotations

import json

import pytest

from runner_process import run_binary
from tests.conftest import shared_path

pytestmark = pytest.mark.slow  # needs the C++ build

SEPARATOR = "\n__ggml_vocab_test__\n"
CASES = {  # llama.cpp vocab file -> (our tokenizer kind, the tokenizer file under ../shared)
    "ggml-vocab-llama-spm": ("sentencepiece", ("tokenizers", "llama2", "tokenizer.model")),
    "ggml-vocab-llama-bpe": ("tiktoken", ("tokenizers", "llama3", "tokenizer.model")),
}


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    inp = shared_path("tokenizers", "llama.cpp-vocab-tests", f"{name}.gguf.inp").read_text(encoding="utf-8")
    out = shared_path("tokenizers", "llama.cpp-vocab-tests", f"{name}.gguf.out").read_text(encoding="utf-8")
    texts = inp.split(SEPARATOR)
    assert texts[-1] == "", "the .inp file ends with a separator"
    texts = texts[:-1]
    ids = [[int(t) for t in line.split()] for line in out.split("\n")[: len(texts)]]
    return list(zip(texts, ids))


@pytest.mark.parametrize("name", sorted(CASES))
def test_encode_matches_llama_cpp_vectors(runner_bins, name):
    kind, tok_parts = CASES[name]
    vectors = read_vectors(name)
    assert len(vectors) == 46
    stdin = "".join(json.dumps(text) + "\n" for text, _ in vectors)
    res = run_binary(runner_bins / "tokenizer_test", kind, shared_path(*tok_parts), "encode", stdin=stdin)
    assert res.returncode == 0, res.stderr
    got = [[int(t) for t in line.split()] for line in res.stdout.split("\n")[: len(vectors)]]
    mismatches = [(text, want, have) for (text, want), have in zip(vectors, got) if want != have]
    assert not mismatches, f"{len(mismatches)} of 46 differ, first: {mismatches[0]}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_restores_llama_cpp_vector_texts(runner_bins, name):
    kind, tok_parts = CASES[name]
    vectors = read_vectors(name)
    stdin = "".join(" ".join(map(str, ids)) + "\n" for _, ids in vectors)
    res = run_binary(runner_bins / "tokenizer_test", kind, shared_path(*tok_parts), "decode", stdin=stdin)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert got == [text for text, _ in vectors]


@pytest.mark.parametrize(
    "kind, tok_parts, ids",
    [  # facts from ../shared/DATA.md
        ("sentencepiece", ("models", "stories260K", "tok512.model"), [403, 407, 261, 378]),
        ("sentencepiece", ("tokenizers", "llama2", "tokenizer.model"), [9038, 2501, 263, 931]),
        ("tiktoken", ("tokenizers", "llama3", "tokenizer.model"), [12805, 5304, 264, 892]),
    ],
)
def test_once_upon_a_time(runner_bins, kind, tok_parts, ids):
    res = run_binary(runner_bins / "tokenizer_test", kind, shared_path(*tok_parts), "encode",
                     stdin=json.dumps("Once upon a time") + "\n")
    assert res.returncode == 0, res.stderr
    assert [int(t) for t in res.stdout.split()] == ids


def test_llama3_special_tokens_decode_as_their_names(runner_bins):
    res = run_binary(runner_bins / "tokenizer_test", "tiktoken", shared_path("tokenizers", "llama3", "tokenizer.model"),
                     "decode", stdin="128000 128006 882 128007 128009 128255\n")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|><|eot_id|><|reserved_special_token_247|>"
    )


@pytest.mark.parametrize(
    "kind, tok_parts",
    [("tiktoken", ("tokenizers", "llama2", "tokenizer.model")), ("sentencepiece", ("tokenizers", "llama3", "tokenizer.model"))],
)
def test_wrong_kind_of_tokenizer_file_is_one_clear_line(runner_bins, kind, tok_parts):
    res = run_binary(runner_bins / "tokenizer_test", kind, shared_path(*tok_parts), "encode", stdin='"x"\n')
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and kind in lines[0], res.stderr


def chat_turn_ids(bins, kind, tok_path, fmt, turns):
    stdin = "".join(json.dumps(t) + "\n" for t in turns)
    res = run_binary(bins / "tokenizer_test", kind, tok_path, f"chat-{fmt}", stdin=stdin)
    assert res.returncode == 0, res.stderr
    return [[int(t) for t in line.split()] for line in res.stdout.splitlines()]


SYSTEM, USER1, REPLY, USER2 = "You answer briefly.", "What is a llama? ", "A camelid.", "  And an alpaca?"


def python_chat_ids(tok, fmt, messages):
    """The Python chat command's prompt ids for (role, content) messages."""
    from torchchat.generation.chat_format import Message, make_format

    return make_format(fmt, tok).encode(tok, [Message(role, content) for role, content in messages])


def test_llama3_chat_turns_match_the_python_chat_format(runner_bins):
    from torchchat.tokenizer.load import load_tokenizer

    path = shared_path("tokenizers", "llama3", "tokenizer.model")
    tok = load_tokenizer(path)
    first, second = chat_turn_ids(runner_bins, "tiktoken", path, "llama3",
                                  [{"system": SYSTEM, "user": USER1}, {"user": USER2}])
    assert first == python_chat_ids(tok, "llama3", [("system", SYSTEM), ("user", USER1)])
    # The reply's tokens sit between the turns in the KV cache; the next turn closes it with <|eot_id|>.
    whole = python_chat_ids(tok, "llama3", [("system", SYSTEM), ("user", USER1), ("assistant", REPLY), ("user", USER2)])
    assert first + tok.encode(REPLY) + second == whole


def test_llama2_chat_turns_match_the_python_chat_format(runner_bins):
    from torchchat.tokenizer.load import load_tokenizer

    path = shared_path("tokenizers", "llama2", "tokenizer.model")
    tok = load_tokenizer(path)
    first, second = chat_turn_ids(runner_bins, "sentencepiece", path, "llama2",
                                  [{"system": SYSTEM, "user": USER1}, {"user": USER2}])
    assert first == python_chat_ids(tok, "llama2", [("system", SYSTEM), ("user", USER1)])
    # The next turn closes the reply with EOS, then opens its own BOS [INST] ... [/INST].
    assert second == [tok.eos_id] + python_chat_ids(tok, "llama2", [("user", USER2)])
