"""response_format (json_object, json_schema) and tools through the real `openai` client, on the
server's random-ish stories260K: constrained decoding makes even this model's output valid JSON that
conforms to the schema, and a forced tool call a valid call."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")
pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (pyproject.toml pins it)")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "happy": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "tags", "happy"],
    "additionalProperties": False,
}
# Small on purpose: stories260K's context is 512 tokens of a 512-piece vocabulary, and the tools are
# described in the prompt.
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                      "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "time", "parameters": {"type": "object", "properties": {"zone": {"enum": [0, 1, 2]}}}}}
MESSAGES = [{"role": "user", "content": "Once upon a time"}]


def conforms(value, schema) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(value, schema)


def json_schema_format(schema=PERSON, **kw):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True, **kw}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_conforms(client, seed):
    out = client.chat.completions.create(model="x", messages=MESSAGES, seed=seed, temperature=1.0, max_tokens=300,
                                         response_format=json_schema_format())
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    conforms(json.loads(choice.message.content), PERSON)


def test_json_schema_greedy_and_n(client):
    out = client.chat.completions.create(model="x", messages=MESSAGES, temperature=0.8, seed=5, n=3, max_tokens=300,
                                         response_format=json_schema_format())
    for choice in out.choices:
        conforms(json.loads(choice.message.content), PERSON)


def test_json_schema_with_logprobs_lists_allowed_alternatives_only(client):
    out = client.chat.completions.create(model="x", messages=MESSAGES, seed=0, max_tokens=300, logprobs=True,
                                         top_logprobs=20, response_format=json_schema_format())
    choice = out.choices[0]
    conforms(json.loads(choice.message.content), PERSON)
    content = choice.logprobs.content
    assert all(-1e9 < t.logprob <= 0 for c in content for t in c.top_logprobs)
    assert min(len(c.top_logprobs) for c in content) == 1  # the grammar forces some tokens (the keys)


def test_json_schema_streamed(client):
    stream = client.chat.completions.create(model="x", messages=MESSAGES, seed=3, max_tokens=300, stream=True,
                                            response_format=json_schema_format())
    parts, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop"
    conforms(json.loads("".join(parts)), PERSON)


def test_json_object_on_completions(client):
    # A small schema keeps the random model's strings short; json_object itself is tested on chat.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99,
                                                                                 "minimum": 0}},
              "required": ["ok", "n"], "additionalProperties": False}
    out = client.completions.create(model="x", prompt="Once upon a time", max_tokens=100, seed=1,
                                    extra_body={"response_format": json_schema_format(schema)})
    conforms(json.loads(out.choices[0].text), schema)


@pytest.mark.parametrize("max_tokens", [12, 60, 200])
def test_json_object_is_closed_within_max_tokens(client, max_tokens):
    # Any object: this model writes strings that never end, so the output is closed (strings, arrays,
    # objects) in the last tokens of the budget rather than cut off.
    for seed in range(3):
        out = client.chat.completions.create(model="x", messages=MESSAGES, seed=seed, max_tokens=max_tokens,
                                             response_format={"type": "json_object"})
        choice = out.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content), dict)
        assert out.usage.completion_tokens <= max_tokens


@pytest.mark.parametrize("fmt, param", [
    (json_schema_format({"type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}),
     "response_format.json_schema.schema"),
    (json_schema_format({"type": "nope"}), "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format"),
    ({"type": "grammar", "grammar": "start: x"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name"),
])
def test_invalid_response_format_is_a_400_naming_the_field(client, fmt, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=5, response_format=fmt)
    assert e.value.body["param"] == param, e.value.body


# -- tools -----------------------------------------------------------------------------------------------

def test_tool_choice_required_makes_a_valid_call(client):
    for seed in range(3):
        out = client.chat.completions.create(model="x", messages=MESSAGES, seed=seed, max_tokens=100,
                                             tools=[WEATHER, TIME], tool_choice="required")
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        tool = {"weather": WEATHER, "time": TIME}[call.function.name]
        conforms(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_choice_calls_that_function_streamed(client):
    stream = client.chat.completions.create(model="x", messages=MESSAGES, seed=4, max_tokens=100, stream=True,
                                            tools=[WEATHER, TIME],
                                            tool_choice={"type": "function", "function": {"name": "time"}})
    calls, reasons, content = [], [], []
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            content.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and "".join(content) == ""
    (call,) = calls
    assert call.index == 0 and call.id and call.function.name == "time"
    conforms(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_tool_history_is_accepted(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather",
                                                             "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]
    out = client.chat.completions.create(model="x", messages=messages, tools=[WEATHER], max_tokens=8, seed=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_and_auto_answer_text(client):
    for choice in ("none", "auto"):
        out = client.chat.completions.create(model="x", messages=MESSAGES, tools=[WEATHER], tool_choice=choice,
                                             max_tokens=10, temperature=0)
        assert out.choices[0].message.tool_calls is None and out.choices[0].message.content


@pytest.mark.parametrize("kw, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, None),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "("}}}}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_invalid_tools_are_a_400_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=5, **kw)
    if param is not None:
        assert e.value.body["param"] == param, e.value.body


def test_tool_messages_need_a_call_id(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", max_tokens=5, messages=[*MESSAGES, {"role": "tool", "content": "x"}])
    assert "tool_call_id" in e.value.body["message"]


# -- a model whose Hugging Face chat template knows tools (Hermes / Qwen 2.5 style) ----------------------

@pytest.fixture(scope="module")
def hermes_client(tmp_path_factory):
    """stories260K served with its tokenizer as tokenizer.json + a tokenizer_config.json whose
    chat_template renders tools and <tool_call> blocks (tests/generation/chat_templates/hermes-tools.jinja)."""
    pytest.importorskip("transformers")
    import shutil

    from transformers import LlamaTokenizer

    from tests.conftest import ROOT, shared_path
    from tests.server.conftest import start_server, stop_server

    folder = tmp_path_factory.mktemp("hermes")
    shutil.copy(shared_path("models", "stories260K", "tok512.model"), folder / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder / "hf"))
    (folder / "hf" / "chat_template.jinja").write_text(
        (ROOT / "tests" / "generation" / "chat_templates" / "hermes-tools.jinja").read_text())
    server = start_server("server", ["--tokenizer-path", str(folder / "hf")], folder / "server.log")
    try:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    finally:
        stop_server(server.process)


def test_hermes_template_forced_call_whole_and_streamed(hermes_client):
    out = hermes_client.chat.completions.create(model="x", messages=MESSAGES, seed=1, max_tokens=150,
                                                tools=[WEATHER, TIME], tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    tool = {"weather": WEATHER, "time": TIME}[call.function.name]
    conforms(json.loads(call.function.arguments), tool["function"]["parameters"])

    stream = hermes_client.chat.completions.create(model="x", messages=MESSAGES, seed=2, max_tokens=150, stream=True,
                                                   tools=[WEATHER], tool_choice={"type": "function",
                                                                                 "function": {"name": "weather"}})
    calls, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls" and [c.function.name for c in calls] == ["weather"]
    conforms(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_hermes_template_renders_tool_history(hermes_client):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "cold"},
    ]
    out = hermes_client.chat.completions.create(model="x", messages=messages, tools=[WEATHER], max_tokens=5,
                                                temperature=0)
    assert out.usage.prompt_tokens > 100  # the tools, the call and the result are in the prompt


def test_chat_chunks_stream_text_and_send_a_held_call_at_the_end():
    from torchchat.generation.engine import GenerationConfig
    from torchchat.server.protocol import Head
    from torchchat.server.responses import ChatChunks
    from torchchat.server.tools import ToolUse
    from torchchat.server.worker import Delta, Finished, Job

    jobs = [Job(prompt_ids=[1], cfg=GenerationConfig(max_new_tokens=50))] * 2
    chunks = ChatChunks(Head("chatcmpl-1", "m", "fp"), jobs, None, False, ToolUse("hermes", ("weather",), False))
    pieces = ["Sure. ", "<tool_", 'call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>']
    sent = [chunks.delta(0, Delta(p)) for p in pieces]
    assert sent[0]["choices"][0]["delta"] == {"content": "Sure. "} and sent[1:] == [None, None]
    *_, calls, end = chunks.finish(0, Finished("stop", 1, 30, 0.0, 0.0))
    (call,) = calls["choices"][0]["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert end["choices"][0]["finish_reason"] == "tool_calls"
    # cut short by max_tokens: the held text is content, no call
    assert chunks.delta(1, Delta("<tool_call>\n{")) is None
    rest, end = chunks.finish(1, Finished("length", 1, 50, 0.0, 0.0))
    assert rest["choices"][0]["delta"] == {"content": "<tool_call>\n{"} and end["choices"][0]["finish_reason"] == "length"
