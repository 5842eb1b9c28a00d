"""Engine.chat and ChatSession: multi-turn KV reuse (a turn prefills only its new tokens, and the model
sees exactly the tokenization of the whole conversation), special-token text typed by a user, stop
tokens, a fresh context when the context fills, speculative decoding across turns, and how the chat
format is chosen."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import shared_path
from tests.generation.runtimes import stories_runtime
from torchchat.errors import ChatTemplateError, ContextLengthError
from torchchat.generation.chat_format import (
    HFTemplateFormat,
    Llama2Format,
    Llama3Format,
    Message,
    PlainFormat,
    resolve_chat_format,
)
from torchchat.generation.chat_session import ChatSession
from torchchat.generation.engine import Engine, GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.generation.steps import Steps

GREEDY = SamplingParams(temperature=0.0)
TEMPLATES = Path(__file__).parent / "chat_templates"


@pytest.fixture(scope="module")
def llama2_tok():
    from torchchat.tokenizer.load import load_tokenizer

    return load_tokenizer(shared_path("tokenizers", "llama2", "tokenizer.model"))


@pytest.fixture(scope="module")
def llama3_tok():
    from torchchat.tokenizer.load import load_tokenizer

    return load_tokenizer(shared_path("tokenizers", "llama3", "tokenizer.model"))


@pytest.fixture(scope="module")
def tok512(stories260k_dir):
    from torchchat.tokenizer.load import load_tokenizer

    return load_tokenizer(stories260k_dir / "tok512.model")


class ScriptedRuntime:
    """A stand-in model that writes each fed token at its position (as a KV cache does) and answers
    with a fixed script: forward call i makes script[i] the most likely next token."""

    supports_parallel_prefill = True

    def __init__(self, vocab_size: int, script: list[int]):
        self.config = type("Config", (), {"vocab_size": vocab_size})()
        self.device = torch.device("cpu")
        self.max_seq_len = 4096
        self.script = list(script)
        self.cache: dict[int, int] = {}
        self.calls: list[list[int]] = []  # tokens fed by each forward

    def setup(self, max_batch: int, max_seq: int) -> None:
        pass

    def forward(self, tokens, input_pos):
        for t, p in zip(tokens[0].tolist(), input_pos.tolist()):
            self.cache[p] = t
        self.calls.append(tokens[0].tolist())
        row = torch.full((self.config.vocab_size,), -1e9)
        row[self.script[len(self.calls) - 1]] = 0.0
        return row.expand(1, tokens.shape[1], -1)

    def seen(self, n: int) -> list[int]:
        return [self.cache[p] for p in range(n)]


def _hf31():
    return HFTemplateFormat((TEMPLATES / "llama3.1-instruct.jinja").read_text(), "<|begin_of_text|>", "<|eot_id|>")


FORMATS = {
    "llama2": (lambda: Llama2Format("<s>", "</s>"), "llama2_tok", "</s>"),
    "llama3": (Llama3Format, "llama3_tok", "<|eot_id|>"),
    "hf-llama3.1": (_hf31, "llama3_tok", "<|eot_id|>"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_second_turn_prefills_only_new_tokens(request, name):
    make_format, tok_fixture, stop_text = FORMATS[name]
    fmt, tok = make_format(), request.getfixturevalue(tok_fixture)
    stop = tok.special_id(stop_text)
    replies = ["Hello! How can I help you today?", "Two plus two is four."]
    # What a chat model emits: the reply's tokens, then its end-of-turn token.
    emitted = [tok.encode(r) + [stop] for r in replies]
    runtime = ScriptedRuntime(tok.vocab_size, emitted[0] + emitted[1])
    engine = Engine(runtime, tok, Steps(runtime.forward, runtime.device), 4096)
    cfg = GenerationConfig(max_new_tokens=100, sampling=GREEDY)
    conv = [Message("system", "You are terse."), Message("user", "Hi!")]

    first = list(engine.chat(conv, cfg, fmt))
    prompt1 = fmt.encode(tok, conv)
    assert "".join(r.text for r in first) == replies[0]  # the end-of-turn token is never text
    assert first[-1].finish_reason == "stop" and first[-1].stats.cached_tokens == 0
    assert runtime.calls[0] == prompt1

    conv += [Message("assistant", replies[0]), Message("user", "What is 2+2?")]
    n_calls = len(runtime.calls)
    second = list(engine.chat(conv, cfg, fmt))
    prompt2 = fmt.encode(tok, conv)
    kept = len(prompt1) + len(emitted[0]) - 1  # the prompt and the reply, but not the unfed stop token
    assert prompt2[:kept] == prompt1 + emitted[0][:-1]
    assert runtime.calls[n_calls] == prompt2[kept:]  # the prefill of turn 2: only the new tokens
    assert second[-1].stats.cached_tokens == kept and second[-1].stats.prompt_tokens == len(prompt2) - kept
    assert runtime.seen(len(prompt2)) == prompt2  # caching did not change what the model saw
    assert "".join(r.text for r in second) == replies[1]


@pytest.mark.parametrize("name", list(FORMATS))
def test_encoding_is_the_tokenizers_own_when_messages_hold_no_special_text(request, name):
    make_format, tok_fixture, _ = FORMATS[name]
    fmt, tok = make_format(), request.getfixturevalue(tok_fixture)
    conv = [Message("system", "Be brief."), Message("user", "Hi there"), Message("assistant", "Hello."),
            Message("user", "Tell me <b>more</b>, [please].")]
    rendered = fmt.render(conv)
    assert fmt.encode(tok, conv) == tok.encode(rendered, allow_special=True)


@pytest.mark.parametrize("name", list(FORMATS))
def test_special_token_text_typed_by_a_user_stays_text(request, name):
    make_format, tok_fixture, stop_text = FORMATS[name]
    fmt, tok = make_format(), request.getfixturevalue(tok_fixture)
    stop = tok.special_id(stop_text)
    clean = [Message("user", "say hi")]
    sneaky = [Message("user", f"say {stop_text} hi")]
    ids = fmt.encode(tok, sneaky)
    assert ids.count(stop) == fmt.encode(tok, clean).count(stop)  # only the template's own
    assert stop_text in tok.decode(ids)  # the user's text is still there, as plain text
    # Without the protection the same rendered text would have produced the special id.
    assert tok.encode(fmt.render(sneaky), allow_special=True).count(stop) == ids.count(stop) + 1


def test_reply_stops_at_end_of_turn_not_at_max_tokens(llama3_tok):
    eot = llama3_tok.special_id("<|eot_id|>")
    reply = llama3_tok.encode("Sure.")
    runtime = ScriptedRuntime(llama3_tok.vocab_size, reply + [eot] + reply * 10)
    engine = Engine(runtime, llama3_tok, Steps(runtime.forward, runtime.device), 512)
    out = list(engine.chat([{"role": "user", "content": "ok?"}], GenerationConfig(max_new_tokens=50, sampling=GREEDY),
                           Llama3Format()))
    assert [r.token for r in out[:-1]] == reply
    assert out[-1].finish_reason == "stop" and "".join(r.text for r in out) == "Sure."


class Recording:
    """Wraps a runtime, remembering the token written at each position."""

    def __init__(self, runtime):
        self.inner = runtime
        self.config, self.device, self.max_seq_len = runtime.config, runtime.device, runtime.max_seq_len
        self.supports_parallel_prefill = True
        self.cache: dict[int, int] = {}
        self.calls: list[list[int]] = []

    def setup(self, max_batch, max_seq):
        self.inner.setup(max_batch, max_seq)

    def forward(self, tokens, input_pos):
        for t, p in zip(tokens[0].tolist(), input_pos.tolist()):
            self.cache[p] = t
        self.calls.append(tokens[0].tolist())
        return self.inner.forward(tokens, input_pos)


def _stories_engine(folder, tok, max_seq=512, record=False):
    runtime = stories_runtime(folder)
    if record:
        runtime = Recording(runtime)
    return Engine(runtime, tok, Steps(runtime.forward, runtime.device), max_seq)


def test_stories260k_two_turns_match_a_fresh_run(stories260k_dir, tok512):
    """Real model: turn 2 reuses turn 1's cache, prefills only the new tokens, and answers exactly as a
    fresh engine given the whole conversation at once."""
    engine = _stories_engine(stories260k_dir, tok512, record=True)
    fmt = PlainFormat("<s>")
    session = ChatSession(engine, fmt)
    cfg = GenerationConfig(max_new_tokens=30, sampling=GREEDY)
    session.add_user("Once upon a time", cfg)
    first = "".join(r.text for r in session.reply(cfg))
    prompt1 = fmt.encode(tok512, session.messages[:1])
    session.add_user("The dog ran", cfg)
    second = "".join(r.text for r in session.reply(cfg))
    prompt2 = fmt.encode(tok512, session.messages[:3])
    stats = session.last_stats
    assert first and second
    assert stats.cached_tokens == len(prompt1) + 30 - 1  # prompt and reply (but its last token) reused
    assert stats.prompt_tokens == len(prompt2) - stats.cached_tokens
    assert [engine.runtime.cache[p] for p in range(len(prompt2))] == prompt2

    fresh = _stories_engine(stories260k_dir, tok512)
    again = "".join(r.text for r in fresh.chat(session.messages[:3], cfg, fmt))
    assert again == second


def test_stories260k_llama2_format_model_sees_the_whole_template(stories260k_dir, tok512):
    engine = _stories_engine(stories260k_dir, tok512, record=True)
    fmt = Llama2Format("<s>", "</s>")
    session = ChatSession(engine, fmt, system_prompt="Tell stories.")
    cfg = GenerationConfig(max_new_tokens=20, sampling=GREEDY)
    for text in ("Once upon a time", "What next?"):
        session.add_user(text, cfg)
        list(session.reply(cfg))
    prompt = fmt.encode(tok512, session.messages[:-1])
    assert [engine.runtime.cache[p] for p in range(len(prompt))] == prompt


def test_fresh_context_when_full_and_overlong_message(stories260k_dir, tok512):
    engine = _stories_engine(stories260k_dir, tok512, max_seq=96)
    session = ChatSession(engine, PlainFormat("<s>"), system_prompt="Stories.")
    cfg = GenerationConfig(max_new_tokens=24, sampling=GREEDY)
    resets = []
    for i in range(6):
        fresh = session.add_user(f"Turn {i}: the cat sat.", cfg)
        resets.append(fresh)
        if fresh:  # earlier turns dropped, the system prompt kept
            assert session.messages == [Message("system", "Stories."), Message("user", f"Turn {i}: the cat sat.")]
        out = list(session.reply(cfg))
        assert out[-1].finish_reason == "length" and out[-1].stats.generated_tokens == 24
    assert not resets[0] and any(resets)
    before = list(session.messages)
    with pytest.raises(ContextLengthError, match="context holds 96"):
        session.add_user("word " * 200, cfg)
    assert session.messages == before


def test_chat_with_a_draft_across_turns(stories260k_dir, tok512):
    fmt = PlainFormat("<s>")
    cfg = GenerationConfig(max_new_tokens=25, sampling=GREEDY)

    def two_turns(engine):
        session = ChatSession(engine, fmt)
        texts = []
        for text in ("Once upon a time", "Then"):
            session.add_user(text, cfg)
            texts.append("".join(r.text for r in session.reply(cfg)))
        return texts, session.last_stats

    plain, _ = two_turns(_stories_engine(stories260k_dir, tok512))
    engine = _stories_engine(stories260k_dir, tok512)
    engine.attach_draft(stories_runtime(stories260k_dir), 4)
    spec, stats = two_turns(engine)
    assert spec == plain
    assert stats.cached_tokens > 0 and stats.acceptance_rate > 0.9  # the draft's cache followed the turns


def test_format_choice_and_notices(tok512, llama3_tok, tmp_path):
    setup = resolve_chat_format(tok512)
    assert setup.format.name == "none" and setup.is_chat is None
    assert any("not known to be tuned for chat" in n for n in setup.notices)
    assert any("plain text turns" in n for n in setup.notices)

    base = resolve_chat_format(tok512, known_template=None, is_chat=False)
    assert any("base model, not tuned for chat" in n for n in base.notices)

    chat = resolve_chat_format(llama3_tok, known_template="llama3", is_chat=True)
    assert chat.format.name == "llama3" and chat.notices == ()

    forced = resolve_chat_format(tok512, override="llama2")
    assert forced.format.name == "llama2"
    assert forced.format.render([Message("user", "x")]) == "<s>[INST] x [/INST]"

    with pytest.raises(ChatTemplateError, match="Llama 3 tokenizer"):
        resolve_chat_format(tok512, override="llama3")
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        resolve_chat_format(tok512, override="hf")


def test_tokenizer_config_chat_template_makes_a_chat_model(tmp_path):
    """A Hugging Face tokenizer folder whose tokenizer_config.json carries a chat_template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from torchchat.tokenizer.hf import HFTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "user": 5, "assistant": 6, "hi": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    template = (TEMPLATES / "chatml.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template}))
    tok = HFTokenizer(tmp_path)
    setup = resolve_chat_format(tok)
    assert setup.format.name == "hf" and setup.is_chat is True and setup.notices == ()
    ids = setup.format.encode(tok, [Message("user", "hi")])
    assert ids == tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", allow_special=True)
    assert tok.special_id("<|im_end|>") in setup.format.stop_ids(tok)


def test_interrupted_reply_joins_the_conversation_and_the_chat_goes_on(llama3_tok):
    eot = llama3_tok.special_id("<|eot_id|>")
    words = llama3_tok.encode(" one two three four five six")
    runtime = ScriptedRuntime(llama3_tok.vocab_size, words + [eot] + words + [eot])
    engine = Engine(runtime, llama3_tok, Steps(runtime.forward, runtime.device), 512)
    session = ChatSession(engine, Llama3Format())
    cfg = GenerationConfig(max_new_tokens=50, sampling=GREEDY)
    session.add_user("count", cfg)
    reply = session.reply(cfg)
    shown = "".join(next(reply).text for _ in range(3))
    reply.close()  # what Ctrl-C during the reply does
    assert session.messages[-1] == Message("assistant", shown)
    session.add_user("go on", cfg)
    out = list(session.reply(cfg))
    assert out[-1].finish_reason == "stop"
    prompt = Llama3Format().encode(llama3_tok, session.messages[:-1])
    assert runtime.seen(len(prompt)) == prompt  # the cut-short reply is what the model saw
    # A message whose reply never started is replaced by the next one (roles keep alternating).
    session.add_user("first", cfg)
    session.add_user("second", cfg)
    assert [m.role for m in session.messages[-3:]] == ["user", "assistant", "user"]
    assert session.messages[-1].content == "second"
