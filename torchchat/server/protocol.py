"""The OpenAI wire format: request models (validated by pydantic) and response/chunk/error bodies.

Requests follow OpenAI's field names and ranges. Fields OpenAI has and this server does not use
(presence_penalty, logprobs, user, tools, ...) are accepted and ignored, as OpenAI ignores unknown
ones; a wrong type or value is an error (see `error_body`). Types are strict: "0.5" is not a number.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None  # None: the loaded model
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 is greedy
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0 keeps only the most likely token
    top_k: int | None = Field(None, ge=0)  # extension: 0 or None means no limit
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_is_text(cls, stop):
        for item in [stop] if isinstance(stop, str) else stop or []:
            if isinstance(item, str):
                no_surrogates(item)
        return stop

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (got {n}); send {n} requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed (got {len(items)})")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @model_validator(mode="after")
    def _options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

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


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for assistant turns that made tool calls

    @field_validator("content")
    @classmethod
    def _valid_content(cls, content):
        return no_surrogates(content) if isinstance(content, str) else content

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens

    @property
    def token_limit(self) -> int | None:
        """Most tokens to generate; None: until a stop or the end of the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    # A string, or token ids; OpenAI also takes a batch of either, which this server answers with one
    # choice only, so a batch must hold exactly one prompt.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions; null: no limit
    echo: bool = False  # prepend the prompt to the returned text

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ValueError(f"only one prompt per request is supported (got {len(prompt)})")
            prompt = prompt[0]
        return no_surrogates(prompt) if isinstance(prompt, str) else prompt

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# Field names, for turning pydantic's error locations (which include union-member tags such as
# 'str' or 'list[int]') into OpenAI's dotted `param`.
_FIELD_NAMES = frozenset(
    name
    for model in (ChatCompletionRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions)
    for name in model.model_fields
)


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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Head:
    """The fields every response and chunk of one request repeats."""

    def __init__(self, id: str, model: str, fingerprint: str):
        self.id, self.model, self.fingerprint, self.created = id, model, fingerprint, now()

    def _fields(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def chat_completion(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return {**self._fields("chat.completion"), "choices": [choice], "usage": usage_}

    def chat_chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
                   include_usage: bool = False) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._fields("chat.completion.chunk"), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last, which carries it
        return chunk

    def usage_chunk(self, object_: str, usage_: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk sent when stream_options.include_usage is true: no choices."""
        return {**self._fields(object_), "choices": [], "usage": usage_}

    def text_completion(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._fields("text_completion"), "choices": [choice], "usage": usage_}

    def text_chunk(self, text: str, finish_reason: str | None = None, include_usage: bool = False) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._fields("text_completion"), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk
