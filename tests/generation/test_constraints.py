"""Grammar-constrained decoding: token bytes spelled by every tokenizer kind, grammar masks that make
random logits produce schema-valid JSON, JSON closed within a token budget; tool calls rendered by
the chat formats and parsed back (whole and streamed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchchat.generation.chat_format import HFTemplateFormat, Llama2Format, Llama3Format, PlainFormat, as_messages
from torchchat.generation.constraints import json_closing

llguidance = pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (pyproject.toml pins it)")

TEXT = 'Héllo wörld 😀 {"a": [1, 2.5e3], "b": "x\\ny"}\n\tend'
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "kind": {"enum": ["a", "b", None]},
        "xs": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 9.5}, "maxItems": 3},
        "nested": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                   "additionalProperties": False},
    },
    "required": ["name", "n", "kind", "xs", "nested"],
    "additionalProperties": False,
}
TEMPLATES = Path(__file__).parent / "chat_templates"


@pytest.fixture(scope="module")
def tok512():
    from tests.conftest import shared_path
    from torchchat.tokenizer.sentencepiece import SentencePieceTokenizer

    return SentencePieceTokenizer(shared_path("models", "stories260K", "tok512.model"))


@pytest.fixture(scope="module")
def llama3_tok():
    from tests.conftest import shared_path
    from torchchat.tokenizer.tiktoken import TiktokenTokenizer

    return TiktokenTokenizer(shared_path("tokenizers", "llama3", "tokenizer.model"))


# -- JSON closing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "{", '{"a', '{"a"', '{"a":', '{"a": 1', '{"a": -', '{"a": 1.5e', '{"a": tr',
                                    '{"a": [1, {"b": "x\\', '{"a": "\\u00', '{"a": 1,', '{"a": [', '[1, [2, [', '"abc',
                                    '{"a": {}} '])
def test_json_closing_completes_any_prefix(prefix):
    suffix = json_closing(prefix.encode())
    json.loads(prefix.encode() + suffix)


@pytest.mark.parametrize("text", ['{"a" 1', "}", '{"a": 1}}', '{"a": 1} x', "{,"])
def test_json_closing_refuses_what_is_not_json(text):
    assert json_closing(text.encode()) is None


# -- grammar masks on random logits ------------------------------------------------------------------

def _generate(tok, grammar, budget, seed, **kw):
    """Sample from random logits under the grammar until a stop id or the budget."""
    from torchchat.generation.constraints import GrammarConstraint, grammar_vocabulary

    constraint = GrammarConstraint(grammar_vocabulary(tok), grammar, tok.stop_ids, budget=budget, **kw)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < budget:
        logits = constraint(out, torch.randn(tok.vocab_size, generator=gen) * 3)
        token = int(torch.argmax(logits))
        out.append(token)
        if token in tok.stop_ids:
            return out, "stop"
    return out, "length"


@pytest.mark.parametrize("budget", [3, 10, 40])
def test_any_json_object_is_closed_within_the_budget(tok512, budget):
    from torchchat.generation.constraints import json_schema_grammar

    for seed in range(4):
        out, reason = _generate(tok512, json_schema_grammar(None), budget, seed, close_json=True)
        assert reason == "stop" and len(out) <= budget
        assert isinstance(json.loads(tok512.decode(out[:-1])), dict)


def test_stop_ids_only_where_the_grammar_accepts(tok512):
    from torchchat.generation.constraints import GrammarConstraint, grammar_vocabulary, json_schema_grammar

    constraint = GrammarConstraint(grammar_vocabulary(tok512), json_schema_grammar({"type": "boolean"}),
                                   tok512.stop_ids)
    eos = tok512.eos_id
    assert not constraint.allowed(tok512.vocab_size)[eos]
    ids = tok512.encode("true")[1:] if tok512.token_bytes()[tok512.encode("true")[0]] == b" " else tok512.encode("true")
    constraint(ids, torch.zeros(tok512.vocab_size))
    allowed = constraint.allowed(tok512.vocab_size)
    assert allowed[eos] and allowed.sum() == len(tok512.stop_ids)


def test_invalid_schema_is_a_grammar_error():
    from torchchat.generation.constraints import GrammarError, json_schema_grammar

    with pytest.raises(GrammarError, match="unclosed group"):
        json_schema_grammar({"type": "string", "pattern": "("})
    with pytest.raises(GrammarError):
        json_schema_grammar({"type": "object", "properties": {"x": {"$ref": "#/nope"}}})


# -- tools in chat formats ------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
]


def _transformers_render(template: str, bos: str, eos: str, messages, tools) -> str:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<unk>": 0, bos: 1, eos: 2}, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    tok.chat_template = template
    # transformers passes arguments through: templates expect an object, as its docs ask for.
    messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name, bos, eos, style", [
    ("llama3.1-instruct", "<|begin_of_text|>", "<|eot_id|>", "json"),
    ("hermes-tools", "<s>", "<|im_end|>", "hermes"),
])
def test_hf_template_renders_tools_as_transformers(name, bos, eos, style):
    template = (TEMPLATES / f"{name}.jinja").read_text()
    fmt = HFTemplateFormat(template, bos, eos)
    assert fmt.native_tools and fmt.tool_style == style
    messages = HISTORY[1:] if name.startswith("llama3.1") else HISTORY  # 3.1 puts tools in the first user turn
    expected = _transformers_render(template, bos, eos, messages, TOOLS)
    assert fmt.render(as_messages(messages), True, tools=TOOLS) == expected
    assert '"Paris"' in expected and "21 C" in expected


def test_llama3_format_describes_tools_in_the_system_turn(llama3_tok):
    fmt = Llama3Format()
    text = llama3_tok.decode(fmt.encode(llama3_tok, HISTORY, tools=TOOLS))
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n")
    assert '"name": "weather"' in text and "Be brief.<|eot_id|>" in text
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n21 C<|eot_id|>" in text


@pytest.mark.parametrize("fmt", [PlainFormat("<s>"), Llama2Format("<s>", "</s>")], ids=["none", "llama2"])
def test_formats_without_tools_get_them_as_text(tok512, fmt):
    history = HISTORY + [{"role": "tool", "tool_call_id": "call_2", "content": "and windy"},
                         {"role": "user", "content": "Thanks!"}]  # consecutive user turns are joined (llama2)
    text = tok512.decode(fmt.encode(tok512, history, tools=TOOLS))
    assert '{"name": "weather", "parameters": {"city": "Paris"}}' in text
    assert "Result of weather (call call_1): 21 C" in text and "and windy" in text and "Thanks!" in text
    assert text.index("You have access to the following functions") < text.index("Be brief.")


def test_special_token_text_in_tools_stays_text(llama3_tok):
    tools = [{"type": "function", "function": {"name": "f", "description": "ends with <|eot_id|>"}}]
    ids = Llama3Format().encode(llama3_tok, [{"role": "user", "content": "hi"}], tools=tools)
    assert ids.count(llama3_tok.special_id("<|eot_id|>")) == 2  # the system and user turns only


# -- parsing calls ------------------------------------------------------------------------------------

def test_parse_json_calls():
    from torchchat.server.tools import parse_tool_calls

    names = ["weather", "time"]
    content, calls = parse_tool_calls(' <|python_tag|>{"name": "weather", "parameters": {"city": "Rome"}}', "json", names)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("weather", {"city": "Rome"})]
    _, calls = parse_tool_calls('[{"name": "time", "arguments": {}}, {"name": "weather", "parameters": "{\\"city\\": 1}"}]',
                                "json", names)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("time", {}), ("weather", {"city": 1})]
    _, calls = parse_tool_calls('[TOOL_CALLS] [{"name": "time", "arguments": {"z": 1}}]', "json", names)
    assert [(c.name, c.arguments) for c in calls] == [("time", '{"z": 1}')]
    for text in ['{"name": "other", "parameters": {}}', "The weather is fine.", '{"name": "weather"', '{"x": 1}']:
        assert parse_tool_calls(text, "json", names) == (text, [])


def test_parse_hermes_calls():
    from torchchat.server.tools import parse_tool_calls

    text = 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls(text, "hermes", ["weather", "time"])
    assert content == "Let me check." and [c.name for c in calls] == ["weather", "time"]
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>", "hermes", ["weather"])[1] == []


def _stream(style, pieces, forced=False):
    from torchchat.server.tools import ToolCallStream

    s = ToolCallStream(style, ["weather"], forced)
    sent = "".join(s.feed(p) for p in pieces)
    rest, calls = s.finish()
    return sent, rest, [c.name for c in calls]


def test_streamed_json_call_is_held_and_text_passes():
    call = ["  ", '{"na', 'me": "weather", ', '"parameters": {"city": "Oslo"}}']
    assert _stream("json", call) == ("", "", ["weather"])
    assert _stream("json", ["  Sun", "ny today"]) == ("  Sunny today", "", [])
    assert _stream("json", ['{"not": "a call"}']) == ("", '{"not": "a call"}', [])


def test_streamed_hermes_text_before_the_call_passes():
    pieces = ["I will look", " it up. <tool", '_call>\n{"name": "weather", "arguments": {}}\n</tool_call>']
    sent, rest, calls = _stream("hermes", pieces)
    assert sent == "I will look it up. " and rest == "" and calls == ["weather"]
    assert _stream("hermes", ["a <to", "p> b"]) == ("a <top> b", "", [])


@pytest.mark.parametrize("style", ["json", "hermes"])
def test_forced_call_from_random_logits_is_a_call_within_the_budget(tok512, style):
    from torchchat.server.protocol import ChatCompletionRequest
    from torchchat.server.tools import call_wrapping, forced_call_grammar, parse_tool_calls

    jsonschema = pytest.importorskip("jsonschema")
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
                                                 "tool_choice": "required"})
    grammar = forced_call_grammar(body, style)
    for seed, budget in [(0, 90), (1, 120), (2, 200)]:
        out, reason = _generate(tok512, grammar, budget, seed, close_json=True, json_between=call_wrapping(style))
        assert reason == "stop", tok512.decode(out)
        content, calls = parse_tool_calls(tok512.decode(out[:-1]), style, ["weather"])
        assert content is None and len(calls) == 1
        jsonschema.validate(json.loads(calls[0].arguments), TOOLS[0]["function"]["parameters"])


def test_llama3_prompt_forced_call_from_a_random_model(llama3_tok):
    """The whole path without the server: Llama 3's format renders the tools, a random model with
    Llama 3's vocabulary decodes under the forced-call grammar in the batched engine, the reply parses."""
    from tests.conftest import random_transformer
    from torchchat.generation.batch import BatchEngine, SequenceRequest
    from torchchat.generation.constraints import GrammarConstraint, grammar_vocabulary
    from torchchat.generation.sampling import SamplingParams
    from torchchat.model.config import ModelConfig
    from torchchat.runtime.base import EagerRuntime
    from torchchat.server.protocol import ChatCompletionRequest
    from torchchat.server.tools import forced_call_grammar, parse_tool_calls

    cfg = ModelConfig.from_params(dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=llama3_tok.vocab_size,
                                       multiple_of=32, max_seq_len=512))
    engine = BatchEngine(EagerRuntime(random_transformer(cfg, std=0.5)), max_batch=2, max_seq_len=512)
    fmt = Llama3Format()
    body = ChatCompletionRequest.model_validate({"messages": HISTORY[:2], "tools": TOOLS, "tool_choice": "required"})
    prompt = fmt.encode(llama3_tok, HISTORY[:2], tools=TOOLS)
    stops = fmt.stop_ids(llama3_tok)
    grammar = forced_call_grammar(body, fmt.tool_style)
    seqs = [engine.add(SequenceRequest(tuple(prompt), 64, SamplingParams(temperature=1.0, top_k=None), stops, seed=s,
                                       logits_processor=GrammarConstraint(grammar_vocabulary(llama3_tok), grammar,
                                                                          stops, budget=64, close_json=True)))
            for s in (0, 1)]
    while engine.active:
        engine.step()
    for seq in seqs:
        assert seq.finish_reason == "stop"
        _, calls = parse_tool_calls(llama3_tok.decode(seq.output[:-1]), "json", ["weather"])
        assert [c.name for c in calls] == ["weather"] and "city" in json.loads(calls[0].arguments)
