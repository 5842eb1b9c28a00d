"""Chat templates against transformers' own rendering (apply_chat_template) of real-world templates."""
from __future__ import annotations

from pathlib import Path

import pytest

from torchchat.errors import ChatTemplateError
from torchchat.generation.chat_format import (
    HFTemplateFormat,
    Llama2Format,
    Llama3Format,
    Message,
    PlainFormat,
    as_messages,
)

TEMPLATES = Path(__file__).parent / "chat_templates"

SYSTEM_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
]
MULTI_TURN = [
    {"role": "system", "content": "  Answer briefly.\n"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "What is 2+2?\n\nThink."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <b>3+3</b>? Unicode: é ✓"},
]
NO_SYSTEM = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "Tell me a story."},
]
CONVERSATIONS = {"system": SYSTEM_TURNS, "multi": MULTI_TURN, "no_system": NO_SYSTEM}

# (template file, bos, eos, conversations it accepts)
CASES = [
    ("llama2-chat", "<s>", "</s>", ("system", "multi", "no_system")),
    ("llama3-instruct", "<|begin_of_text|>", "<|end_of_text|>", ("system", "multi", "no_system")),
    ("llama3.1-instruct", "<|begin_of_text|>", "<|end_of_text|>", ("system", "multi", "no_system")),
    ("mistral-instruct-v0.1", "<s>", "</s>", ("no_system",)),
    ("zephyr", "<s>", "</s>", ("system", "multi", "no_system")),
    ("chatml", "<s>", "<|im_end|>", ("system", "multi", "no_system")),
    ("gemma-it", "<bos>", "<eos>", ("no_system",)),
]


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer made offline; only its chat-template rendering is used."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    def make(template: str, bos: str, eos: str):
        backend = Tokenizer(models.WordLevel({"<unk>": 0, bos: 1, eos: 2}, unk_token="<unk>"))
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
        tok.chat_template = template
        return tok

    return make


def _reference(hf_tokenizer, template, bos, eos, messages, add_generation_prompt=True) -> str:
    tok = hf_tokenizer(template, bos, eos)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name,bos,eos,convs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_hf_template_matches_transformers(hf_tokenizer, name, bos, eos, convs, add_generation_prompt):
    template = _template(name)
    fmt = HFTemplateFormat(template, bos, eos)
    for key in convs:
        messages = CONVERSATIONS[key]
        expected = _reference(hf_tokenizer, template, bos, eos, messages, add_generation_prompt)
        assert fmt.render(as_messages(messages), add_generation_prompt) == expected, key


def test_hf_template_raise_exception_like_transformers(hf_tokenizer):
    import jinja2

    template = _template("gemma-it")
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        _reference(hf_tokenizer, template, "<bos>", "<eos>", SYSTEM_TURNS)
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        HFTemplateFormat(template, "<bos>", "<eos>").render(as_messages(SYSTEM_TURNS))


def test_hf_template_syntax_error_is_typed():
    with pytest.raises(ChatTemplateError, match="does not parse"):
        HFTemplateFormat("{% for m in messages %}{{ m.content }", "<s>", "</s>")


def test_hf_template_generation_block_and_tojson(hf_tokenizer):
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ {'r': m.role, 'c': m.content} | tojson }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    messages = NO_SYSTEM + [{"role": "user", "content": "<tag> & \"quotes\" é"}]
    expected = _reference(hf_tokenizer, template, "<s>", "</s>", messages)
    assert HFTemplateFormat(template, "<s>", "</s>").render(as_messages(messages)) == expected


@pytest.mark.parametrize("key", ["system", "multi", "no_system"])
def test_llama2_format_is_the_llama2_chat_template(hf_tokenizer, key):
    messages = CONVERSATIONS[key]
    expected = _reference(hf_tokenizer, _template("llama2-chat"), "<s>", "</s>", messages)
    assert Llama2Format("<s>", "</s>").render(as_messages(messages)) == expected


def test_llama2_format_layout():
    text = Llama2Format().render(as_messages(MULTI_TURN[:4]))
    assert text == (
        "<s>[INST] <<SYS>>\n  Answer briefly.\n\n<</SYS>>\n\nWho are you? [/INST] I am an assistant </s>"
        "<s>[INST] What is 2+2?\n\nThink. [/INST]"
    )


def test_llama2_format_rejects_out_of_order_roles():
    with pytest.raises(ChatTemplateError, match="alternating"):
        Llama2Format().render([Message("user", "a"), Message("user", "b")])


@pytest.mark.parametrize("key", ["system", "multi", "no_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama3_format_is_the_llama3_instruct_template(hf_tokenizer, key, add_generation_prompt):
    messages = CONVERSATIONS[key]
    expected = _reference(hf_tokenizer, _template("llama3-instruct"), "<|begin_of_text|>", "<|end_of_text|>",
                          messages, add_generation_prompt)
    assert Llama3Format().render(as_messages(messages), add_generation_prompt) == expected


def test_llama3_format_layout():
    text = Llama3Format().render(as_messages(SYSTEM_TURNS))
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_plain_format_continues_text():
    messages = [Message("user", "Once upon a time"), Message("assistant", " there was a cat."),
                Message("user", "The end")]
    assert PlainFormat("<s>").render(messages) == "<s>Once upon a time there was a cat.\nThe end"


def test_as_messages_rejects_malformed():
    with pytest.raises(ChatTemplateError, match="role"):
        as_messages([{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="text"):
        as_messages([{"role": "user", "content": 3}])


@pytest.mark.parametrize("template_file, expected", [
    ("chatml.jinja", "chatml"), ("gemma-it.jinja", "gemma"), ("llama3-instruct.jinja", "llama3"),
    ("llama2-chat.jinja", "llama2"), ("zephyr.jinja", None),
])
def test_runner_format_names_the_family_a_template_writes(template_file, expected):
    """What `export` writes as runner_chat_format for the C++ runners (runner/chat_format.cpp)."""
    from pathlib import Path

    from torchchat.generation.chat_format import runner_format

    template = (Path(__file__).parent / "chat_templates" / template_file).read_text()
    assert runner_format(None, template) == expected
    assert runner_format("llama3", template) == "llama3"  # the registry's own wins


def test_runner_format_of_the_phi_template():
    from torchchat.generation.chat_format import runner_format

    phi = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    assert runner_format("hf", phi) == "phi3"
    assert runner_format(None, None) is None
