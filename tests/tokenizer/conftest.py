"""Tokenizer test fixtures: the real tokenizers from ../shared, loaded once per session, and
llama.cpp's tokenizer test vectors."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoint.llamacpp_tools import _bytes_to_unicode as bytes_to_unicode
from tests.conftest import shared_path

VOCAB_TESTS = ("tokenizers", "llama.cpp-vocab-tests")


def read_vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's `<name>.inp` strings (each followed by a `__ggml_vocab_test__` line) with the ids
    of the matching line of `<name>.out`."""
    inp = shared_path(*VOCAB_TESTS, f"{name}.inp").read_text(encoding="utf-8")
    out = shared_path(*VOCAB_TESTS, f"{name}.out").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    assert texts[-1] == "", "the .inp file ends with a separator"
    ids = [[int(t) for t in line.split()] for line in out.split("\n")]
    assert ids[-1] == [], "the .out file ends with a newline"
    assert len(texts) == len(ids) == 47
    return list(zip(texts[:-1], ids[:-1]))


SPM_CASES = "ggml-vocab-llama-spm.gguf"
BPE_CASES = "ggml-vocab-llama-bpe.gguf"


@pytest.fixture(scope="session")
def spm_cases() -> list[tuple[str, list[int]]]:
    return read_vocab_cases(SPM_CASES)


@pytest.fixture(scope="session")
def bpe_cases() -> list[tuple[str, list[int]]]:
    return read_vocab_cases(BPE_CASES)


@pytest.fixture(scope="session")
def llama2_model_path() -> Path:
    return shared_path("tokenizers", "llama2", "tokenizer.model")


@pytest.fixture(scope="session")
def llama3_model_path() -> Path:
    return shared_path("tokenizers", "llama3", "tokenizer.model")


@pytest.fixture(scope="session")
def llama2_tok(llama2_model_path):
    from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer

    return SentencePieceTokenizer(llama2_model_path)


@pytest.fixture(scope="session")
def llama3_tok(llama3_model_path):
    from torchchat.tokenizer.tiktoken import TiktokenTokenizer

    return TiktokenTokenizer(llama3_model_path)


@pytest.fixture(scope="session")
def tok512(stories260k_dir):
    from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer

    return SentencePieceTokenizer(stories260k_dir / "tok512.model")


@pytest.fixture(scope="session")
def llama3_hf_dir(tmp_path_factory, llama3_model_path) -> Path:
    """A Llama 3 tokenizer.json made by transformers' own tiktoken converter (the way Meta's HF
    repositories were made), with a tokenizer_config.json like Llama 3.1 Instruct's."""
    import json

    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from torchchat.tokenizer.tiktoken import llama3_special_tokens

    specials = llama3_special_tokens(128000)
    tok = TikTokenConverter(vocab_file=str(llama3_model_path), extra_special_tokens=list(specials)).converted()
    folder = tmp_path_factory.mktemp("llama3-hf")
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def llama3_hf(llama3_hf_dir):
    from torchchat.tokenizer.hf import HFTokenizer

    return HFTokenizer(llama3_hf_dir)


@pytest.fixture(scope="session")
def llama2_hf_dir(tmp_path_factory, llama2_model_path) -> Path:
    """tokenizer.json + tokenizer_config.json written by transformers' LlamaTokenizer from the Llama 2
    SentencePiece model."""
    import shutil

    pytest.importorskip("transformers")
    from transformers import LlamaTokenizer

    src = tmp_path_factory.mktemp("llama2-spm")
    shutil.copy(llama2_model_path, src / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(src))
    folder = tmp_path_factory.mktemp("llama2-hf")
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def llama2_hf(llama2_hf_dir):
    from torchchat.tokenizer.hf import HFTokenizer

    return HFTokenizer(llama2_hf_dir)


def write_bpe_gguf(path: Path, ranks: dict[bytes, int], specials: dict[str, int], *, pre: str = "llama-bpe") -> None:
    """A vocabulary-only GGUF (tokenizer.ggml.model "gpt2") made from tiktoken ranks the way
    llama.cpp's converter and transformers' TikTokenConverter do: the token of rank r comes from every
    split of it into two lower-ranked tokens, merges ordered by r."""
    import gguf

    chars = bytes_to_unicode()  # the tests' own copy of GPT-2's table, not the package's

    def spell(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    by_rank = sorted(ranks, key=ranks.__getitem__)
    assert [ranks[t] for t in by_rank] == list(range(len(by_rank)))
    merges = []
    for token in by_rank:
        splits = sorted(
            (ranks[token[:i]], ranks[token[i:]], i)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        )
        merges += [f"{spell(token[:i])} {spell(token[i:])}" for _, _, i in splits]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([spell(t) for t in by_rank] + list(specials))
    writer.add_token_types([gguf.TokenType.NORMAL] * len(by_rank) + [gguf.TokenType.CONTROL] * len(specials))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials["<|begin_of_text|>"])
    writer.add_eos_token_id(specials["<|end_of_text|>"])
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ bos_token }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


@pytest.fixture(scope="session")
def spm_gguf_reader():
    """The Llama 2 vocabulary-only GGUF, parsed once (gguf's reader takes seconds for 32000 tokens)."""
    import gguf

    return gguf.GGUFReader(shared_path(*VOCAB_TESTS, SPM_CASES))
