"""The server driven by the real `openai` Python client (a client nobody here wrote)."""
from __future__ import annotations

import pytest

from tests.conftest import shared_path
from tests.server.conftest import DOWNLOADED

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")

STORY = "Once upon a time"


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def sp():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(shared_path("models", "stories260K", "tok512.model")))


def chat(client, model_id, **kw):
    kw.setdefault("messages", [{"role": "user", "content": STORY}])
    return client.chat.completions.create(model=model_id, **kw)


def test_completion_from_bos_matches_llama2c_golden(client, model_id):
    # llama2.c's own output: BOS, then 200 greedy steps, decoded.
    golden = shared_path("models", "stories260K", "expected_greedy_200.txt").read_text()
    out = client.completions.create(model=model_id, prompt=[1], max_tokens=200, temperature=0)
    assert out.choices[0].text == golden
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 1 and out.usage.completion_tokens == 200


def test_completion_continues_the_prompts_text(client, model_id):
    # A prompt cut from llama2.c's golden story is continued exactly as the golden goes on, spaces
    # included: the returned text is what follows the prompt (" Lily", not "Lily"), as with OpenAI.
    golden = shared_path("models", "stories260K", "expected_greedy_200.txt").read_text()
    prompt = golden[: golden.index(" Lily")]  # "Once upon a time, there was a little girl named"
    text = client.completions.create(model=model_id, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    assert text.startswith(" Lily")
    assert prompt + text == golden[: len(prompt) + len(text)]


def test_chat_response_fields_and_usage(client, model_id, sp):
    out = chat(client, model_id, max_tokens=20, temperature=0)
    assert out.object == "chat.completion"
    assert out.id.startswith("chatcmpl-") and out.created > 0 and out.system_fingerprint.startswith("fp_")
    assert out.model == model_id
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    # BOS + the SentencePiece ids of the text (a base model's messages are joined as plain text)
    assert out.usage.prompt_tokens == 1 + len(sp.encode(STORY))
    assert out.usage.completion_tokens == 20
    assert out.usage.total_tokens == out.usage.prompt_tokens + 20


def test_chat_equals_completion_of_same_text(client, model_id):
    # One user message and no template: the chat prompt is the message's text, so both endpoints
    # must produce the same greedy continuation.
    c = chat(client, model_id, max_tokens=40, temperature=0).choices[0].message.content
    t = client.completions.create(model=model_id, prompt=STORY, max_tokens=40, temperature=0).choices[0].text
    assert c == t


def test_text_parts_are_joined(client, model_id):
    parts = [{"type": "text", "text": "Once upon"}, {"type": "text", "text": " a time"}]
    a = chat(client, model_id, messages=[{"role": "user", "content": parts}], max_tokens=15, temperature=0)
    b = chat(client, model_id, max_tokens=15, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_max_completion_tokens(client, model_id):
    out = chat(client, model_id, max_completion_tokens=7, temperature=0)
    assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"


def test_chat_stream_equals_non_stream(client, model_id):
    full = chat(client, model_id, max_tokens=30, temperature=0)
    chunks = list(chat(client, model_id, max_tokens=30, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5  # really streamed


def test_stream_without_usage_has_no_usage_chunk(client, model_id):
    chunks = list(chat(client, model_id, max_tokens=5, temperature=0, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_completion_stream_and_echo(client, model_id):
    full = client.completions.create(model=model_id, prompt=STORY, max_tokens=25, temperature=0)
    chunks = list(client.completions.create(model=model_id, prompt=STORY, max_tokens=25, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    echoed = client.completions.create(model=model_id, prompt=STORY, max_tokens=25, temperature=0, echo=True)
    assert echoed.choices[0].text == STORY + full.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, model_id, stream):
    plain = chat(client, model_id, max_tokens=60, temperature=0).choices[0].message.content
    words = plain.split()
    # A stop string in the middle of the text, several tokens long and split across tokens.
    stop = " ".join(words[5:7])
    cut = plain[: plain.find(stop)]
    assert 0 < len(cut) < len(plain)
    for stops in (stop, ["zzzz-never", stop]):
        if stream:
            chunks = list(chat(client, model_id, max_tokens=60, temperature=0, stop=stops, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            out = chat(client, model_id, max_tokens=60, temperature=0, stop=stops)
            text, finish = out.choices[0].message.content, [out.choices[0].finish_reason]
        assert text == cut
        assert finish == ["stop"]


def test_stop_string_that_never_occurs_changes_nothing(client, model_id):
    plain = chat(client, model_id, max_tokens=30, temperature=0).choices[0].message
    out = chat(client, model_id, max_tokens=30, temperature=0, stop=["\u00a7\u00a7"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in out) == plain.content


def test_seed_reproducibility(client, model_id):
    def sample(seed):
        return chat(client, model_id, max_tokens=40, temperature=1.0, seed=seed).choices[0].message.content

    a, b, c = sample(1234), sample(1234), sample(4321)
    assert a == b
    assert a != c
    # An unseeded request between two seeded ones does not change what the seed gives.
    sample(None)
    assert sample(1234) == a


def test_models(client, model_id, api_server):
    listed = client.models.list().data
    assert [m.id for m in listed] == [model_id, DOWNLOADED]
    assert model_id == api_server.health()["model"]
    assert all(m.object == "model" and m.created > 0 for m in listed)
    assert client.models.retrieve(model_id).id == model_id
    assert client.models.retrieve(DOWNLOADED).id == DOWNLOADED  # an id with a slash
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_requested_model_name(client, model_id):
    # A name that is no other model of ours is served by the loaded one (clients often send a fixed
    # name); a downloaded model that is not loaded is a 404 rather than a silent substitute.
    assert chat(client, "gpt-4o", max_tokens=3).model == model_id
    for name in (DOWNLOADED, "llama3.2-1b"):
        with pytest.raises(openai.NotFoundError, match="not loaded") as e:
            chat(client, name, max_tokens=3)
        assert e.value.code == "model_not_found"


def test_errors(client, model_id, api_server):
    with pytest.raises(openai.BadRequestError, match="response_format") as e:
        chat(client, model_id, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}})
    assert e.value.param == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens") as e:
        chat(client, model_id, messages=[{"role": "user", "content": "Once upon a time " * 200}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, model_id, temperature=3.5)
    assert e.value.param == "temperature"
    wrong = openai.OpenAI(base_url=api_server.base_url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(wrong, model_id, max_tokens=2)
