"""The OpenAI wire format: request models (validated by pydantic) and response/chunk/error bodies.

Requests follow OpenAI's field names and ranges. Fields that change what OpenAI would generate and
that this server does not implement (functions, audio, ...) are a 400 naming the field (see
UNSUPPORTED), never silently ignored; fields that change nothing here (user,
metadata, ...) and unknown ones are ignored, as OpenAI ignores unknown ones. A wrong type or value is
an error (see `error_body`). Types are strict: "0.5" is not a number.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from torchchat import __version__


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def no_surrogates(text: str) -> str:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which is not text: no tokenizer can encode
    it. Refused as a 400 here rather than failing as a 500 in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate ({text[e.start]!r} at character {e.start}); send valid "
                         "Unicode text") from None
    return text


class StreamOptions(_Request):
    include_usage: bool = False


# The most of each list-valued option; lm-eval alone sends 6 stop strings.
MAX_STOP = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20

# Fields OpenAI (or vLLM) takes that this server does not implement, with what to do instead. Sending
# one with a value other than its no-op is a 400 naming it.
UNSUPPORTED = {
    # Only /v1/chat/completions declares tools (a completion has no chat template to describe them).
    "tools": "tools are supported on /v1/chat/completions only",
    "tool_choice": "tools are supported on /v1/chat/completions only",
    "parallel_tool_calls": "tools are supported on /v1/chat/completions only",
    "functions": "the deprecated functions parameter is not supported; use tools",
    "function_call": "the deprecated function_call parameter is not supported; use tool_choice",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "guided_json": "guided decoding is not supported",
    "guided_regex": "guided decoding is not supported",
    "guided_choice": "guided decoding is not supported",
    "guided_grammar": "guided decoding is not supported",
    "suffix": "insertion (suffix) is not supported",
    "best_of": "best_of other than n is not supported; use n",
}
# The values of those fields that ask for nothing (accepted).
_NO_OP = {"tool_choice": ("none",), "modalities": (["text"],), "parallel_tool_calls": (True, False)}

_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for schema and function names


class JsonSchemaFormat(_Request):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # true: keywords the grammar library lacks are a 400; else ignored


class ResponseFormat(_Request):
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema`; the JSON types are
    enforced by constrained decoding (torchchat/generation/constraints.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object ({name, schema, strict})")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only allowed with type json_schema (got type {self.type})")
        return self


class SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras are checked against UNSUPPORTED

    model: str | None = None  # None: the loaded model
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 is greedy
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0 keeps only the most likely token
    top_k: int | None = Field(None, ge=0)  # extension: 0 or None means no limit
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension (vLLM, llama.cpp): 1 is off
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop_is_text(cls, stop):
        for item in [stop] if isinstance(stop, str) else stop or []:
            if isinstance(item, str):
                no_surrogates(item)
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (got {key!r})")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"biases must be in [-100, 100] (got {value} for token {key})")
        return bias

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed (got {len(items)})")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @model_validator(mode="after")
    def _options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field asked for that this server does not implement."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value is not None and value not in _NO_OP.get(name, ()):
                if name == "best_of" and value == self.n:
                    continue
                return name, UNSUPPORTED[name]
        return None

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(_Request):
    type: str
    text: str

    @field_validator("text")
    @classmethod
    def _valid_text(cls, text: str) -> str:
        return no_surrogates(text)

    @field_validator("type")
    @classmethod
    def _text_only(cls, type_: str) -> str:
        if type_ != "text":
            raise ValueError(f"only text content parts are supported (got '{type_}')")
        return type_


class CalledFunction(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    """A call an assistant turn made (in the request's history, or in a response)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on assistant turns (those that made tool calls)
    tool_calls: list[ToolCall] | None = None  # assistant turns only
    tool_call_id: str | None = None  # tool turns: the call this is the result of
    name: str | None = None  # a participant's or function's name: accepted, not rendered

    @field_validator("content")
    @classmethod
    def _valid_content(cls, content):
        return no_surrogates(content) if isinstance(content, str) else content

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed on assistant messages (got role {self.role})")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required on {self.role} messages")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Request):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, parameters):
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of an object (got type {parameters['type']!r})")
        return parameters


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools):
        names = [t.function.name for t in tools or []]
        if len(set(names)) != len(names):
            raise ValueError("function names must be unique")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, choice, info: ValidationInfo):
        names = [t.function.name for t in info.data.get("tools") or []]
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice is only allowed when tools are specified")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"no tool named {choice.function.name!r} (tools: {', '.join(names)})")
        return choice

    @property
    def tool_mode(self) -> str | None:
        """None: no tools (or tool_choice "none"); "auto", "required", or the one function's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    @property
    def logprob_count(self) -> int | None:
        """None: no logprobs; n: each token's and its n most likely alternatives'."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        """Most tokens to generate; None: until a stop or the end of the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    # A string, or token ids, or a batch of either: each prompt gets n choices, indexed in order.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions; null: no limit
    echo: bool = False  # prepend the prompt to the returned text (and its tokens' logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # each token's and its n likeliest

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and len(prompt) > MAX_N and not isinstance(prompt[0], int):
            raise ValueError(f"at most {MAX_N} prompts per request (got {len(prompt)})")
        for item in [prompt] if isinstance(prompt, str) else prompt:
            if isinstance(item, str):
                no_surrogates(item)
        return prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, list) and not isinstance(self.prompt[0], int):
            return list(self.prompt)
        return [self.prompt]

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# Field names, for turning pydantic's error locations (which include union-member tags such as
# 'str' or 'list[int]') into OpenAI's dotted `param`.
_FIELD_NAMES = frozenset(
    name
    for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions, ResponseFormat,
                  JsonSchemaFormat, ToolCall, CalledFunction, ToolDefinition, FunctionDefinition, NamedToolChoice,
                  ToolChoiceFunction)
    for name in model.model_fields
) | {"schema"}


def error_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages.0.content'."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or p in _FIELD_NAMES]
    return ".".join(parts) or None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix time in whole seconds, as OpenAI's `created`."""
    return int(time.time())


def system_fingerprint(*parts: str) -> str:
    """Stable for one server configuration (torchchat version, model, dtype, device, quantization)."""
    digest = hashlib.sha256("|".join((__version__, *parts)).encode()).hexdigest()
    return f"fp_{digest[:10]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:  # OpenAI's field: prompt tokens served from the (KV) cache
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class Head:
    """The fields every response and chunk of one request repeats."""

    def __init__(self, id: str, model: str, fingerprint: str):
        self.id, self.model, self.fingerprint, self.created = id, model, fingerprint, now()

    def _fields(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def chat_completion(self, choices: list[dict[str, Any]], usage_: dict[str, Any]) -> dict[str, Any]:
        """`choices`: from `chat_choice`, one per n."""
        return {**self._fields("chat.completion"), "choices": choices, "usage": usage_}

    @staticmethod
    def chat_choice(index: int, text: str | None, finish_reason: str, logprobs: Any = None,
                    tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def chat_chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
                   include_usage: bool = False, index: int = 0, logprobs: Any = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        chunk = {**self._fields("chat.completion.chunk"), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last, which carries it
        return chunk

    def usage_chunk(self, object_: str, usage_: dict[str, Any]) -> dict[str, Any]:
        """The extra last chunk sent when stream_options.include_usage is true: no choices."""
        return {**self._fields(object_), "choices": [], "usage": usage_}

    def text_completion(self, choices: list[dict[str, Any]], usage_: dict[str, Any]) -> dict[str, Any]:
        """`choices`: from `text_choice`, one per prompt and n."""
        return {**self._fields("text_completion"), "choices": choices, "usage": usage_}

    @staticmethod
    def text_choice(index: int, text: str, finish_reason: str, logprobs: Any = None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def text_chunk(self, text: str, finish_reason: str | None = None, include_usage: bool = False,
                   index: int = 0, logprobs: Any = None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        chunk = {**self._fields("text_completion"), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk
