"""Chat templates: a conversation (role/content messages) -> prompt text -> token ids.

Formats:
- "llama2": `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] ...`
  (the Llama-2-chat template, with the tokenizer's own BOS/EOS text);
- "llama3": `<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...`;
- "hf": any Hugging Face `chat_template` (Jinja), rendered the way `transformers` renders it;
- "none": plain text turns for models without a chat template (the reply continues the text).

Special tokens: special-token text that the *template* writes ("<|eot_id|>", "</s>") becomes its
special id; the same text inside a *message* (a user typing "<|eot_id|>") stays plain text. Messages
are marked before rendering (special-token text in them is wrapped in private-use marker characters)
and the marked spans are encoded with `allow_special=False`.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

from torchchat.errors import ChatTemplateError

TEMPLATE_CHOICES = ("llama2", "llama3", "hf", "none")

# Private-use code points (plane 15) that bracket special-token text found inside messages.
_MARK_OPEN = "\U000f0001"
_MARK_CLOSE = "\U000f0002"
_MARKED = re.compile(f"{_MARK_OPEN}(.*?){_MARK_CLOSE}", re.DOTALL)
# Special tokens are written <...> (Llama 3, SentencePiece, ChatML, Gemma) or [...] (Mistral v3);
# a candidate is checked with the tokenizer's special_id, so this only bounds the search.
_CLOSERS = {"<": ">", "[": "]"}
_MAX_SPECIAL_LEN = 128


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool" (Hugging Face templates may accept more)
    content: str
    # An assistant turn's calls, OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments"}}
    # with "arguments" JSON text.
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    tool_call_id: str | None = None  # a tool turn: the call it answers


def as_messages(messages: Iterable[Message | Mapping[str, Any]]) -> list[Message]:
    """Messages given as Message objects or OpenAI-style dicts ({"role", "content"}, and
    "tool_calls" / "tool_call_id" for tool calling)."""
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
            continue
        try:
            role, content = m["role"], m["content"]
        except (KeyError, TypeError) as e:
            raise ChatTemplateError(f"a chat message needs 'role' and 'content'; got {m!r}") from e
        if not isinstance(role, str) or not isinstance(content, str):
            raise ChatTemplateError(f"a chat message's role and content must be text; got {m!r}")
        out.append(Message(role, content, tuple(m.get("tool_calls") or ()), m.get("tool_call_id")))
    return out


def _map_strings(value: Any, fn) -> Any:
    """`value` (JSON-like) with `fn` applied to every string in it, keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


# -- tools ---------------------------------------------------------------------------------------------
# Formats whose template knows no tools (llama2, none, an HF template that never mentions `tools`) get
# them as text: a system message that describes the functions and asks for Llama 3.1's JSON call
# format, each call the assistant made written in that format, each tool result as a user turn.

def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The instruction that describes `tools` (OpenAI's {"type": "function", "function": {...}})
    and asks for a call as Llama 3.1's JSON format: {"name": ..., "parameters": {...}}."""
    listed = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return ("You have access to the following functions. To call a function, respond with only a JSON "
            'object in the format {"name": function name, "parameters": dictionary of argument name and its '
            "value}, and nothing else. Do not use variables.\n\n" + listed)


def json_call_text(call: Mapping[str, Any]) -> str:
    """An OpenAI tool call as Llama 3.1's JSON call text."""
    function = call.get("function", call)
    return json.dumps({"name": function["name"], "parameters": parse_arguments(function.get("arguments"))},
                      ensure_ascii=False)


def parse_arguments(arguments: Any) -> Any:
    """OpenAI sends a call's arguments as JSON text; templates want the object (text that is not JSON
    stays text)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def tools_as_text(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Message]:
    """The conversation with its tools, calls and tool results written as plain system/user/assistant
    turns (see above); consecutive user turns are joined (Llama 2 needs strict alternation)."""
    names = {c.get("id"): c.get("function", {}).get("name") for m in messages for c in m.tool_calls}
    out: list[Message] = []
    if tools:
        if messages and messages[0].role == "system":
            out.append(Message("system", tools_prompt(tools) + "\n\n" + messages[0].content))
            messages = messages[1:]
        else:
            out.append(Message("system", tools_prompt(tools)))
    for m in messages:
        if m.tool_calls:
            calls = "\n".join(json_call_text(c) for c in m.tool_calls)
            m = Message("assistant", (m.content + "\n" if m.content else "") + calls)
        elif m.role == "tool":
            name = names.get(m.tool_call_id) or "the function"
            m = Message("user", f"Result of {name} (call {m.tool_call_id}): {m.content}")
        if out and out[-1].role == m.role == "user":
            m = Message("user", out[-1].content + "\n\n" + m.content)
            out.pop()
        out.append(m)
    return out


def special_spans(text: str, tokenizer) -> list[tuple[int, int]]:
    """(start, end) character spans of the special tokens the tokenizer knows that occur in `text`,
    left to right, not overlapping."""
    spans = []
    i = 0
    while i < len(text):
        close = _CLOSERS.get(text[i])
        if close is not None:
            j = text.find(close, i + 1, i + _MAX_SPECIAL_LEN)
            if j != -1 and tokenizer.special_id(text[i : j + 1]) is not None:
                spans.append((i, j + 1))
                i = j + 1
                continue
        i += 1
    return spans


def mark_specials(text: str, tokenizer) -> str:
    """Wrap special-token text inside a message in markers, so it is encoded as plain text.
    Marker characters already in the text are dropped first (they could forge a marked span)."""
    text = text.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")
    out, last = [], 0
    for start, end in special_spans(text, tokenizer):
        out += [text[last:start], _MARK_OPEN, text[start:end], _MARK_CLOSE]
        last = end
    out.append(text[last:])
    return "".join(out)


def encode_marked(text: str, tokenizer) -> list[int]:
    """Encode a rendered prompt: special-token text parsed as special ids, except in marked spans
    (which came from messages) and which are encoded as plain text."""
    ids: list[int] = []
    pieces = _MARKED.split(text)  # [template text, marked, template text, marked, ...]
    for i, piece in enumerate(pieces):
        # A template may cut a marked span apart (e.g. with split()); lone markers are dropped.
        piece = piece.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")
        if piece:
            ids += tokenizer.encode(piece, allow_special=i % 2 == 0)
    return ids


def token_text(tokenizer, token_id: int | None) -> str | None:
    """The text of a special token (e.g. BOS -> "<s>" or "<|begin_of_text|>"), or None."""
    if token_id is None:
        return None
    text = tokenizer.decode([token_id])
    if text and tokenizer.special_id(text) == token_id:
        return text
    # SentencePiece decodes control pieces to nothing; their piece text is one of these.
    for candidate in ("<s>", "</s>", "<bos>", "<eos>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>"):
        if tokenizer.special_id(candidate) == token_id:
            return candidate
    return None


class ChatFormat(ABC):
    """Renders a conversation to prompt text and says which tokens end a reply."""

    name: str = ""
    continues_text = False  # True: the reply continues the prompt's text rather than starting a message
    native_tools = False  # True: render() takes `tools`, tool turns and calls in the model's own format
    # How the model writes a call: "json" (Llama 3.1: {"name", "parameters"}) or "hermes" (Qwen, Hermes:
    # <tool_call>{"name", "arguments"}</tool_call>).
    tool_style = "json"

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text, special tokens written as their text. `tools` (OpenAI's tool list) only
        where native_tools is True."""

    @abstractmethod
    def stop_texts(self) -> tuple[str, ...]:
        """Special-token texts that end the assistant's reply (besides the tokenizer's own stop ids)."""

    def stop_ids(self, tokenizer) -> frozenset[int]:
        ids = {tokenizer.special_id(t) for t in self.stop_texts()}
        return frozenset(i for i in ids if i is not None) | tokenizer.stop_ids

    def encode(self, tokenizer, messages: Iterable[Message | Mapping[str, Any]],
               add_generation_prompt: bool = True, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of the rendered conversation: the template's special tokens as special ids,
        message text (tool definitions and calls included) as plain text. BOS comes from the
        template, never added on top. `tools`: OpenAI's tool list, rendered natively or as text."""
        mark = lambda text: mark_specials(text, tokenizer)  # noqa: E731
        marked = [Message(m.role, mark(m.content), tuple(_map_strings(list(m.tool_calls), mark)), m.tool_call_id)
                  for m in as_messages(messages)]
        tools = _map_strings(list(tools), mark) if tools else None
        uses_tools = tools or any(m.tool_calls or m.role == "tool" for m in marked)
        if not uses_tools:
            return encode_marked(self.render(marked, add_generation_prompt), tokenizer)
        if self.native_tools:
            return encode_marked(self.render(marked, add_generation_prompt, tools=tools), tokenizer)
        return encode_marked(self.render(tools_as_text(marked, tools), add_generation_prompt), tokenizer)


class Llama2Format(ChatFormat):
    """The Llama-2-chat template (as in meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json): an
    optional system prompt folded into the first user turn, turns alternating user/assistant."""

    name = "llama2"

    def __init__(self, bos_token: str = "<s>", eos_token: str = "</s>"):
        self.bos, self.eos = bos_token, eos_token

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, tools=None) -> str:
        messages = list(messages)
        system = None
        if messages and messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
        out = []
        for i, m in enumerate(messages):
            if m.role not in ("user", "assistant") or (m.role == "user") != (i % 2 == 0):
                raise ChatTemplateError(
                    "Llama 2 chat needs turns alternating user/assistant/user/..., after an optional system message"
                )
            content = m.content
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            if m.role == "user":
                out.append(f"{self.bos}[INST] {content.strip()} [/INST]")
            else:
                out.append(f" {content.strip()} {self.eos}")
        # The template has no generation prompt: a prompt ending in [/INST] is where the reply goes.
        return "".join(out)

    def stop_texts(self) -> tuple[str, ...]:
        return (self.eos,)


class Llama3Format(ChatFormat):
    """The Llama 3 Instruct template: a header per message, each message closed by <|eot_id|>."""

    name = "llama3"
    REQUIRED = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    native_tools = True

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """With tools, as Llama 3.1 documents JSON tool calling: "Environment: ipython" and the
        functions in the system message, calls as {"name", "parameters"} JSON, results in
        `ipython` turns."""
        messages = list(messages)
        if tools:
            system = "Environment: ipython\n\n" + tools_prompt(tools)
            if messages and messages[0].role == "system":
                system += "\n\n" + messages[0].content
                messages = messages[1:]
            messages.insert(0, Message("system", system))
        out = ["<|begin_of_text|>"] if messages else []
        for m in messages:
            role, content = ("ipython" if m.role == "tool" else m.role), m.content
            if m.tool_calls:
                content = "\n".join(json_call_text(c) for c in m.tool_calls)
            out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>")
        if add_generation_prompt:
            out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(out)

    def stop_texts(self) -> tuple[str, ...]:
        return ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


class PlainFormat(ChatFormat):
    """No chat template: the conversation is one running text. A user or system message starts a
    new line; the reply continues the text directly (as a base model completes a prompt)."""

    name = "none"
    continues_text = True

    def __init__(self, bos_token: str | None = None):
        self.bos = bos_token or ""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, tools=None) -> str:
        out = [self.bos]
        for i, m in enumerate(messages):
            if m.role != "assistant" and i > 0:
                out.append("\n")
            out.append(m.content)
        return "".join(out)

    def stop_texts(self) -> tuple[str, ...]:
        return ()


class HFTemplateFormat(ChatFormat):
    """A Hugging Face `chat_template` (Jinja) rendered as `transformers.apply_chat_template` renders
    it: sandboxed, trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that
    does not escape HTML, `{% generation %}` blocks, and bos_token / eos_token as variables."""

    name = "hf"

    def __init__(self, template: str, bos_token: str | None = None, eos_token: str | None = None,
                 extra_stop_texts: Sequence[str] = ()):
        self.template_source = template
        self.bos, self.eos = bos_token, eos_token
        self._extra_stops = tuple(extra_stop_texts)
        self._template = _compile(template)
        # A template that reads `tools` renders them (and calls, and tool turns) itself.
        self.native_tools = re.search(r"\btools\b", template) is not None
        self.tool_style = "hermes" if "<tool_call>" in template else "json"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """As transformers renders it: `tools` is OpenAI's list; a call's arguments are passed as
        an object (templates write them with `tojson`), a tool turn carries `tool_call_id`."""
        import jinja2

        variables: dict[str, Any] = {
            "messages": [_template_message(m) for m in messages],
            "tools": list(tools) if tools else None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        if self.bos is not None:
            variables["bos_token"] = self.bos
        if self.eos is not None:
            variables["eos_token"] = self.eos
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e

    def stop_texts(self) -> tuple[str, ...]:
        return ((self.eos,) if self.eos else ()) + self._extra_stops


def _template_message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": parse_arguments(c["function"].get("arguments"))}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
        rendering a prompt it renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template does not parse (line {e.lineno}: {e.message}); "
            "choose another with --chat-template llama2|llama3|none"
        ) from e


# The formats the C++ runners write themselves (runner/chat_format.cpp): Llama 2 and 3 as above, and the
# plain-message turns of Llama's relatives' Hugging Face templates, which the runners cannot render.
RUNNER_FORMATS = ("llama2", "llama3", "chatml", "gemma", "phi3")
# Markers of a Hugging Face chat template -> the runner format that writes its turns (first match wins).
_TEMPLATE_MARKERS = (
    (("<|im_start|>", "<|im_end|>"), "chatml"),  # Qwen2/2.5/3, SmolLM2/3
    (("<start_of_turn>", "<end_of_turn>"), "gemma"),  # Gemma 2/3
    (("<|assistant|>", "<|end|>"), "phi3"),  # Phi-4-mini (its template writes '<|' + role + '|>'); Phi-3
    (("<|start_header_id|>", "<|eot_id|>"), "llama3"),
    (("[INST]", "[/INST]"), "llama2"),
)


def runner_format(known_template: str | None, hf_template: str | None) -> str | None:
    """The runner format (RUNNER_FORMATS) of a model, for exported artifacts' metadata: the registry's
    llama2/llama3, else the family whose special tokens its Hugging Face chat template writes, else None
    (a base model, or a template of no known family: the runner is then told with -f)."""
    if known_template in ("llama2", "llama3"):
        return known_template
    if hf_template:
        for markers, name in _TEMPLATE_MARKERS:
            if all(m in hf_template for m in markers):
                return name
    return None


@dataclass(frozen=True)
class ChatSetup:
    """The format a model chats with, whether it is known to be tuned for chat, and what to tell the user."""

    format: ChatFormat
    is_chat: bool | None  # True: the registry or tokenizer config says so; False: a base model; None: unknown
    notices: tuple[str, ...] = ()


def make_format(name: str, tokenizer) -> ChatFormat:
    """A format by name ("llama2", "llama3", "hf", "none") for this tokenizer."""
    bos = token_text(tokenizer, tokenizer.bos_id)
    eos = token_text(tokenizer, tokenizer.eos_id)
    if name == "llama2":
        if bos is None or eos is None:
            raise ChatTemplateError("the llama2 chat template needs a tokenizer with BOS and EOS tokens; "
                                    "choose another with --chat-template")
        return Llama2Format(bos, eos)
    if name == "llama3":
        missing = [t for t in Llama3Format.REQUIRED if tokenizer.special_id(t) is None]
        if missing:
            raise ChatTemplateError(f"the llama3 chat template needs a Llama 3 tokenizer (this one has no "
                                    f"{', '.join(missing)}); choose another with --chat-template")
        return Llama3Format()
    if name == "hf":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ChatTemplateError("--chat-template hf: the tokenizer carries no chat_template "
                                    "(tokenizer_config.json or GGUF metadata); use llama2, llama3 or none")
        return HFTemplateFormat(template, bos, eos)
    if name == "none":
        return PlainFormat(bos)
    raise ChatTemplateError(f"unknown chat template '{name}'; use one of {', '.join(TEMPLATE_CHOICES)}")


def resolve_chat_format(tokenizer, override: str | None = None, known_template: str | None = None,
                        is_chat: bool | None = None) -> ChatSetup:
    """Pick the chat format: `override` (--chat-template) first, then the registry's template
    (`known_template`, "llama2"/"llama3"), then the tokenizer's own `chat_template`, else plain text
    turns. Chat-ness comes from the registry (`is_chat`) or the tokenizer's chat_template, never
    from a file name."""
    hf_template = getattr(tokenizer, "chat_template", None)
    is_chat = is_chat if is_chat is not None else (True if hf_template else None)
    notices = []
    if override is not None:
        fmt = make_format(override, tokenizer)
    elif known_template is not None:
        fmt = make_format(known_template, tokenizer)
    elif hf_template:
        fmt = make_format("hf", tokenizer)
    else:
        fmt = make_format("none", tokenizer)
        notices.append("No chat template is known for this model: using plain text turns "
                       "(choose one with --chat-template llama2|llama3).")
    if is_chat is False:
        notices.insert(0, "This is a base model, not tuned for chat: it may produce nonsensical or false output.")
    elif is_chat is None:
        notices.insert(0, "This model is not known to be tuned for chat: it may produce nonsensical or false output.")
    return ChatSetup(fmt, is_chat, tuple(notices))
