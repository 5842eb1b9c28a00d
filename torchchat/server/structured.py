"""What a request asks the output to be, as a grammar over the model's tokens: `response_format`
json_object / json_schema, or one tool call (tool_choice "required" or a named function). Each job
(one per choice) gets its own GrammarConstraint as its logits processor."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Sequence

from torchchat.server.protocol import ChatCompletionRequest, SamplingFields
from torchchat.server.worker import Job


class InvalidRequest(ValueError):
    """A 400: `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def request_grammar(body: SamplingFields, tool_style: str = "json") -> str | None:
    """The llguidance grammar the request's output must follow; None: unconstrained. Raises
    InvalidRequest for a schema the grammar library refuses."""
    from torchchat.generation.constraints import GrammarError, json_schema_grammar

    fmt = body.response_format
    json_format = fmt is not None and fmt.type != "text"
    if isinstance(body, ChatCompletionRequest) and body.tool_mode is not None:
        if json_format and body.tool_mode == "auto":
            raise InvalidRequest("response_format json_object/json_schema together with tools needs tool_choice "
                                 "'none' (answer in JSON) or 'required'/a named function (call a tool)",
                                 "response_format")
        if body.tool_mode != "auto":
            from torchchat.server.tools import forced_call_grammar

            try:
                return forced_call_grammar(body, tool_style)
            except GrammarError as e:
                # Each tool's schema compiled alone (check_tool_schemas): what fails is their union.
                raise InvalidRequest(f"Invalid schema in tools: {e}", "tools") from e
    if not json_format:
        return None
    if fmt.type == "json_object":
        return json_schema_grammar(None)
    spec = fmt.json_schema
    try:
        return json_schema_grammar(spec.schema_, strict=bool(spec.strict))
    except GrammarError as e:
        raise InvalidRequest(f"Invalid schema for response_format '{spec.name}': {e}",
                             "response_format.json_schema.schema") from e


def check_tool_schemas(body: ChatCompletionRequest) -> None:
    """Every tool's parameters must be a schema the grammar library compiles (as OpenAI refuses an
    invalid one), even where the output is not constrained."""
    from torchchat.generation.constraints import GrammarError, json_schema_grammar

    for i, tool in enumerate(body.tools or []):
        if tool.function.parameters is None:
            continue
        try:
            json_schema_grammar(tool.function.parameters, strict=bool(tool.function.strict))
        except GrammarError as e:
            raise InvalidRequest(f"Invalid schema for function '{tool.function.name}': {e}",
                                 f"tools.{i}.function.parameters") from e


async def constrain(jobs: Sequence[Job], body: SamplingFields, tokenizer, tool_style: str = "json") -> list[Job]:
    """`jobs` with a grammar constraint each where the request asks for one. Compiling a schema (and,
    the first time, spelling the vocabulary) can take a while: in a thread, off the event loop."""

    def build() -> list[Job]:
        from torchchat.generation.constraints import GrammarConstraint, GrammarError, grammar_vocabulary

        if isinstance(body, ChatCompletionRequest) and body.tool_mode is not None:
            check_tool_schemas(body)
        grammar = request_grammar(body, tool_style)
        if grammar is None:
            return list(jobs)
        # The JSON (a response_format's, or a forced call's) is closed in time, within max_tokens.
        forced_call = isinstance(body, ChatCompletionRequest) and body.tool_mode not in (None, "auto")
        from torchchat.server.tools import call_wrapping

        between = call_wrapping(tool_style) if forced_call else (b"", b"")
        vocab = grammar_vocabulary(tokenizer)
        out = []
        for job in jobs:
            stops = tokenizer.stop_ids if job.cfg.stop_ids is None else job.cfg.stop_ids
            try:
                constraint = GrammarConstraint(vocab, grammar, stops, budget=job.cfg.max_new_tokens,
                                               close_json=True, json_between=between)
                out.append(replace(job, logits_processor=constraint))
            except GrammarError as e:
                raise InvalidRequest(f"Invalid schema: {e}", "response_format") from e
        return out

    return await asyncio.to_thread(build)
