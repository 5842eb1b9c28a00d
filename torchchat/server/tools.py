"""Tool calling: the model's output -> OpenAI `tool_calls`, whole or while streaming, and the grammar
that forces a call when tool_choice is "required" or names a function.

Two call formats, chosen by the chat format (ChatFormat.tool_style):
- "json", Llama 3.1's JSON tool calling: the whole reply is `{"name": f, "parameters": {...}}`
  (a leading `<|python_tag|>` or Mistral's `[TOOL_CALLS]` is dropped; "arguments" is accepted for "parameters"; a JSON list of
  such objects is several calls). Also what formats without native tools are asked to produce.
- "hermes", Qwen 2.5 / Hermes: `<tool_call>\n{"name": f, "arguments": {...}}\n</tool_call>`, one
  block per call, possibly after some text (which becomes the message's content).
A reply that does not parse as calls to the given functions is plain content."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from torchchat.server.protocol import ChatCompletionRequest

_PYTHON_TAG = "<|python_tag|>"
# What models put before a JSON call: Llama 3.1's <|python_tag|>, Mistral's [TOOL_CALLS].
_CALL_PREFIXES = (_PYTHON_TAG, "[TOOL_CALLS]")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(re.escape(_OPEN) + r"(.*?)(?:" + re.escape(_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of the arguments object

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's tool call object (with `index` in a streamed delta)."""
        out: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _call(obj: Any, names: Sequence[str], args_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    keys = (args_key, "arguments" if args_key == "parameters" else "parameters")
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, style: str, names: Sequence[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole reply; no calls: (text, [])."""
    if style == "hermes" and _OPEN in text:
        before = text[: text.index(_OPEN)].strip()
        calls = []
        for body in _HERMES_BLOCK.findall(text):
            try:
                call = _call(json.loads(body), names, "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return (before or None), calls
    stripped = text.strip()
    for prefix in _CALL_PREFIXES:
        stripped = stripped.removeprefix(prefix).strip()
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return text, []
    items = value if isinstance(value, list) and value else [value]
    calls = [_call(v, names, "parameters") for v in items]
    if any(c is None for c in calls):
        return text, []
    return None, calls


class ToolCallStream:
    """Splits a streamed reply into content to send now and text held back because it may be a call.

    "json" style: the reply is a call only if it starts (after blanks) with `{`, `[` or
    `<|python_tag|>`, so text is held until its first non-blank character decides; a call is held to
    the end. "hermes" style: text before `<tool_call>` streams (less any tail that could be the start
    of the tag), the rest is held. `forced`: every reply is a call (tool_choice required or named)."""

    def __init__(self, style: str, names: Sequence[str], forced: bool = False):
        self.style, self.names = style, names
        self.held = ""
        self.streaming = False  # decided: plain content, sent as it comes
        self.calling = forced  # decided: a call, held to the end
        self.sent: list[str] = []

    def feed(self, text: str) -> str:
        """Content to send now for `text`."""
        if self.streaming:
            return self._send(text)
        self.held += text
        if self.calling:
            return ""
        if self.style == "hermes":
            if _OPEN in self.held:
                i = self.held.index(_OPEN)
                out, self.held, self.calling = self.held[:i], self.held[i:], True
                return self._send(out)
            keep = _partial_suffix(self.held, _OPEN)
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
            return self._send(out)
        lead = self.held.lstrip()
        if not lead or any(p.startswith(lead) for p in _CALL_PREFIXES):
            return ""
        if lead[0] in "{[" or lead.startswith(_CALL_PREFIXES):
            self.calling = True
            return ""
        self.streaming = True
        out, self.held = self.held, ""
        return self._send(out)

    def finish(self, complete: bool = True) -> tuple[str, list[ParsedCall]]:
        """(content still to send, calls) at the end of the reply; a reply cut short (`complete`
        False: max_tokens, a stop string) makes no calls."""
        held, self.held = self.held, ""
        if not held or not complete:
            return held, []
        content, calls = parse_tool_calls(held, self.style, self.names)
        if not calls:
            return held, []
        if self.style == "hermes":  # the text before the tag has been sent
            return "", calls
        return content or "", calls

    def _send(self, text: str) -> str:
        if text:
            self.sent.append(text)
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# -- forcing a call ------------------------------------------------------------------------------------

def call_schema(body: ChatCompletionRequest, args_key: str) -> dict[str, Any]:
    """JSON schema of one call object, to the named function or (required) to any of the tools."""
    mode = body.tool_mode
    options = []
    for tool in body.tools or []:
        f = tool.function
        if mode not in ("auto", "required") and f.name != mode:
            continue
        params = f.parameters if f.parameters else {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": f.name}, args_key: params},
                        "required": ["name", args_key], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_wrapping(style: str) -> tuple[bytes, bytes]:
    """The text a forced call's grammar puts around its JSON object."""
    return (f"{_OPEN}\n".encode(), f"\n{_CLOSE}".encode()) if style == "hermes" else (b"", b"")


def forced_call_grammar(body: ChatCompletionRequest, style: str) -> str:
    """The grammar of exactly one call in `style` (llguidance Lark with an embedded JSON schema)."""
    from torchchat.generation.constraints import JSON_WHITESPACE, lark_grammar

    # Keywords llguidance lacks are ignored unless every function is strict (as for response_format).
    options = {"whitespace_pattern": JSON_WHITESPACE,
               "lenient": not all(t.function.strict for t in body.tools or [])}
    if style == "hermes":
        schema = json.dumps({**call_schema(body, "arguments"), "x-guidance": options})
        return lark_grammar(f'start: "{_OPEN}\\n" call "\\n{_CLOSE}"\ncall: %json {schema}')
    schema = json.dumps({**call_schema(body, "parameters"), "x-guidance": options})
    return lark_grammar(f"start: call\ncall: %json {schema}")


@dataclass(frozen=True)
class ToolUse:
    """How a chat request's replies are read for calls."""

    style: str  # "json" | "hermes"
    names: tuple[str, ...]
    forced: bool  # tool_choice "required" or a named function

    @classmethod
    def of(cls, body: ChatCompletionRequest, style: str) -> "ToolUse | None":
        mode = body.tool_mode
        if mode is None:
            return None
        return cls(style, tuple(t.function.name for t in body.tools or []), mode != "auto")

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.style, self.names, self.forced)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        return parse_tool_calls(text, self.style, self.names)


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages for ChatFormat.encode: role and text, and an assistant turn's calls or
    a tool turn's call id."""
    out = []
    for m in body.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def tool_list(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """OpenAI's tool list for the chat template; None when there are none or tool_choice is "none"
    (the model is then not told of them)."""
    if body.tool_mode is None:
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]
