"""HFTokenizer over tokenizer.json files written by transformers (Llama 3 via its tiktoken converter,
Llama 2 via LlamaTokenizer), checked against llama.cpp's vectors and the stories facts."""
from __future__ import annotations

import json
import shutil

import pytest

from torchchat.errors import TokenizerError
from torchchat.tokenizer.hf import HFTokenizer


def test_llama3_tokenizer_json_matches_llama_cpp(llama3_hf, bpe_cases):
    for text, expected in bpe_cases:
        assert llama3_hf.encode(text) == expected, text
        assert llama3_hf.decode(expected) == text


def test_llama3_config(llama3_hf, llama3_hf_dir):
    assert llama3_hf.kind == "hf"
    assert (llama3_hf.bos_token, llama3_hf.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert (llama3_hf.bos_id, llama3_hf.eos_id) == (128000, 128009)
    assert llama3_hf.vocab_size == 128256
    # eos from the config plus the end-of-text/turn tokens Llama 3 has.
    assert llama3_hf.stop_ids == frozenset({128001, 128008, 128009})
    assert llama3_hf.chat_template == json.loads((llama3_hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert llama3_hf.encode("Once upon a time", bos=True) == [128000, 12805, 5304, 264, 892]


def test_llama3_special_text(llama3_hf):
    text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    plain = llama3_hf.encode(text)
    assert max(plain) < 128000 and llama3_hf.decode(plain) == text
    assert llama3_hf.encode(text, allow_special=True) == [128006, 882, 128007, 271, 13347, 128009]
    # The flag does not stick: plain encoding after a special one is still plain.
    assert llama3_hf.encode(text) == plain
    assert llama3_hf.special_id("<|eot_id|>") == 128009 and llama3_hf.special_id("hello") is None


def test_llama2_tokenizer_json(llama2_hf, llama2_hf_dir):
    assert llama2_hf.encode("Once upon a time") == [9038, 2501, 263, 931]
    assert (llama2_hf.bos_token, llama2_hf.eos_token, llama2_hf.bos_id, llama2_hf.eos_id) == ("<s>", "</s>", 1, 2)
    assert llama2_hf.encode("Hi", bos=True, eos=True) == [1, *llama2_hf.encode("Hi"), 2]
    assert llama2_hf.stop_ids == frozenset({2})
    assert llama2_hf.decode([9038, 2501, 263, 931]) == "Once upon a time"
    assert llama2_hf.chat_template is None


def test_post_processor_bos_is_not_applied(tmp_path, llama2_hf_dir):
    """Real Llama tokenizer.json files carry a TemplateProcessing post-processor that prepends BOS;
    encode adds BOS only when asked, and without a tokenizer_config.json BOS is read from it."""
    spec = json.loads((llama2_hf_dir / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("Once upon a time") == [9038, 2501, 263, 931]
    assert tok.bos_id == 1 and tok.add_bos
    assert tok.eos_id == 2  # "</s>" found among the special tokens


def test_chat_template_jinja_file_and_named_templates(tmp_path, llama2_hf_dir):
    shutil.copy(llama2_hf_dir / "tokenizer.json", tmp_path)
    config = {
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = HFTokenizer(tmp_path)
    assert tok.chat_template == "D" and tok.bos_token == "<s>"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages }}")
    assert HFTokenizer(tmp_path).chat_template == "J{{ messages }}"


def test_generation_config_stop_ids(tmp_path, llama2_hf_dir):
    shutil.copy(llama2_hf_dir / "tokenizer.json", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 13]}))
    assert HFTokenizer(tmp_path).stop_ids == frozenset({2, 13})


def test_bad_files(tmp_path, llama2_hf_dir):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(TokenizerError, match="not a tokenizer.json"):
        HFTokenizer(config)
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ')
    with pytest.raises(TokenizerError, match="not valid JSON"):
        HFTokenizer(broken)
    odd = tmp_path / "odd.json"
    odd.write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        HFTokenizer(odd)
    folder = tmp_path / "wrong-eos"
    folder.mkdir()
    shutil.copy(llama2_hf_dir / "tokenizer.json", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        HFTokenizer(folder)
