"""Llama's relatives through the serving paths: a real `server` process answering the openai client
with the family's own chat template (the reply the library engine gives for the same messages, which
tests/checkpoint/test_hf_family_folders.py holds to transformers' greedy tokens), and `eval` scoring a
task. Tiny random Hugging Face folders (tests/checkpoint/hf_family_folders.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "checkpoint"))

from hf_family_folders import write_folder  # noqa: E402
from test_hf_families import CASES, FAMILIES  # noqa: E402

from tests.server.conftest import start_server, stop_server  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]


def _folder(tmp_path_factory, family: str) -> Path:
    case, tokenizer_family = FAMILIES[family]
    config_cls, model_cls, kwargs = CASES[case]
    path = tmp_path_factory.mktemp(family)
    write_folder(path, config_cls, model_cls, kwargs, tokenizer_family)
    return path


def _engine_reply(folder: Path, max_tokens: int) -> str:
    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.generation.chat_format import as_messages, resolve_chat_format
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams

    built = build_model(BuildSpec(source=ModelSource(checkpoint_path=folder), dtype=torch.float32))
    setup = resolve_chat_format(built.tokenizer)
    engine = make_engine(built, max_seq_len=64)
    ids = engine.chat_prompt(as_messages(MESSAGES), setup.format)
    stops = built.tokenizer.stop_ids | setup.format.stop_ids(built.tokenizer)
    cfg = GenerationConfig(max_new_tokens=max_tokens, sampling=SamplingParams(temperature=0), stop_ids=stops)
    return built.tokenizer.decode(list(engine.tokens(ids, cfg)))


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_server_chats_with_the_family_template(family, tmp_path_factory, tmp_path):
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
    folder = _folder(tmp_path_factory, family)
    server = start_server("server", [], tmp_path / "server.log",
                          model=["--checkpoint-path", str(folder), "--dtype", "fp32", "--max-seq-length", "64"])
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        model_id = client.models.list().data[0].id
        out = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=8, temperature=0)
    finally:
        stop_server(server.process)
    reply = _engine_reply(folder, 8)
    assert reply  # the random model says something before any end of turn
    assert out.choices[0].message.content == reply
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > len(MESSAGES[0]["content"].split())


def test_eval_scores_a_family_model(tmp_path_factory, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    import json

    from torchchat.cli import main

    folder = _folder(tmp_path_factory, "qwen3")
    out = tmp_path / "results.json"
    code = main(["eval", "--checkpoint-path", str(folder), "--dtype", "fp32", "--tasks", "storybook_cloze",
                 "--limit", "3", "--max-seq-length", "128", "--output-json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())["results"]["storybook_cloze"]
    assert 0.0 <= result["acc,none"] <= 1.0
    assert json.loads(out.read_text())["n-samples"]["storybook_cloze"]["effective"] == 3
