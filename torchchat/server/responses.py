"""Response bodies and event streams of /v1/chat/completions and /v1/completions from the worker's
results: one choice per job (n per prompt), logprobs in each endpoint's shape, usage summed over the
choices (the prompt counted once per prompt, as OpenAI does)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from torchchat.server import protocol
from torchchat.server.choices import Collected, merged
from torchchat.server.logprobs import CompletionLogprobs, TokenTexts, chat_content, merge
from torchchat.server.protocol import Head
from torchchat.server.tools import ToolUse
from torchchat.server.worker import Delta, Finished, Job, ModelWorker

log = logging.getLogger("torchchat.server")


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(finished: Sequence[Finished], n: int) -> dict[str, Any]:
    """Summed over choices; each prompt (every n-th job) counted once."""
    prompts = finished[::n]
    return protocol.usage(sum(f.prompt_tokens for f in prompts), sum(f.completion_tokens for f in finished),
                          sum(f.cached_tokens for f in prompts))


def _error_event(e: Exception) -> str:
    log.error("generation failed", exc_info=e)
    return sse(protocol.error_body(f"generation failed: {e}", type_="server_error"))


# -- chat ------------------------------------------------------------------------------------------------

def chat_body(head: Head, jobs: Sequence[Job], results: Sequence[Collected], texts: TokenTexts,
              tools: ToolUse | None = None) -> dict[str, Any]:
    """With `tools`, a reply that parses as calls becomes message.tool_calls (finish_reason "tool_calls")."""
    choices = []
    for i, (job, r) in enumerate(zip(jobs, results)):
        lp = None
        if job.top_logprobs is not None:
            lp = {"content": chat_content(texts, r.tokens, job.prompt_ids[-1])}
        content, calls = tools.parse(r.text) if tools and r.finished.finish_reason == "stop" else (r.text, [])
        if calls:
            choices.append(Head.chat_choice(i, content, "tool_calls", lp, [c.openai() for c in calls]))
        else:
            choices.append(Head.chat_choice(i, r.text, r.finished.finish_reason, lp))
    return head.chat_completion(choices, usage([r.finished for r in results], len(jobs)))


async def chat_events(head: Head, worker: ModelWorker, jobs: Sequence[Job], texts: TokenTexts,
                      include_usage: bool, tools: ToolUse | None = None) -> AsyncIterator[str]:
    """With `tools`, text that may be a call is held back; calls come as one tool_calls delta at the
    end (finish_reason "tool_calls"), text that was not a call as content."""
    for i in range(len(jobs)):
        yield sse(head.chat_chunk({"role": "assistant", "content": ""}, include_usage=include_usage, index=i))
    prev = [job.prompt_ids[-1] for job in jobs]
    finished: list[Finished | None] = [None] * len(jobs)
    splitters = [tools.stream() if tools else None for _ in jobs]
    try:
        async for i, item in merged(worker, jobs):
            split = splitters[i]
            if isinstance(item, Delta):
                lp = None
                if jobs[i].top_logprobs is not None:
                    lp = {"content": chat_content(texts, item.tokens, prev[i])}
                    if item.tokens:
                        prev[i] = item.tokens[-1].token
                text = split.feed(item.text) if split else item.text
                if text or lp or not split:
                    yield sse(head.chat_chunk({"content": text}, include_usage=include_usage, index=i, logprobs=lp))
            else:
                finished[i] = item
                reason = item.finish_reason
                if split:
                    rest, calls = split.finish(complete=reason == "stop")
                    if calls:
                        reason = "tool_calls"
                    if rest:
                        yield sse(head.chat_chunk({"content": rest}, include_usage=include_usage, index=i))
                    if calls:
                        delta = {"tool_calls": [c.openai(index=k) for k, c in enumerate(calls)]}
                        yield sse(head.chat_chunk(delta, include_usage=include_usage, index=i))
                yield sse(head.chat_chunk({}, reason, include_usage=include_usage, index=i))
    except Exception as e:  # headers are sent: report the failure in the stream, as OpenAI does
        yield _error_event(e)
        return
    if include_usage:
        yield sse(head.usage_chunk("chat.completion.chunk", usage(finished, len(jobs))))
    yield "data: [DONE]\n\n"


# -- completions -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompletionChoice:
    """What the route knows of one choice besides its job: the prompt's text (for echo)."""

    prompt_text: str
    echo: bool


def _completion_logprobs(texts: TokenTexts, job: Job, c: CompletionChoice, r: Collected) -> dict[str, list]:
    if c.echo:
        lps = CompletionLogprobs(texts)
        out = lps.add(job.prompt_ids, r.finished.prompt_logprobs or [None] * len(job.prompt_ids))
    else:
        lps, out = CompletionLogprobs(texts, prev=job.prompt_ids[-1], offset=len(c.prompt_text)), None
    return merge(out, lps.add([t.token for t in r.tokens], [t.logprob for t in r.tokens]))


def completion_body(head: Head, jobs: Sequence[Job], meta: Sequence[CompletionChoice], results: Sequence[Collected],
                    texts: TokenTexts, n: int) -> dict[str, Any]:
    choices = []
    for i, (job, c, r) in enumerate(zip(jobs, meta, results)):
        lp = _completion_logprobs(texts, job, c, r) if job.top_logprobs is not None else None
        text = (c.prompt_text if c.echo else "") + r.text
        choices.append(Head.text_choice(i, text, r.finished.finish_reason, lp))
    return head.text_completion(choices, usage([r.finished for r in results], n))


async def completion_events(head: Head, worker: ModelWorker, jobs: Sequence[Job], meta: Sequence[CompletionChoice],
                            texts: TokenTexts, n: int, include_usage: bool) -> AsyncIterator[str]:
    """With echo, each choice starts with its prompt's text; with echo and logprobs, the prompt's
    logprobs (known once its prefill ends) come in a chunk of empty text just before the finish chunk."""
    lps = {}
    for i, (job, c) in enumerate(zip(jobs, meta)):
        lps[i] = CompletionLogprobs(texts, prev=job.prompt_ids[-1], offset=len(c.prompt_text))
        if c.echo:
            yield sse(head.text_chunk(c.prompt_text, include_usage=include_usage, index=i))
    finished: list[Finished | None] = [None] * len(jobs)
    try:
        async for i, item in merged(worker, jobs):
            job = jobs[i]
            if isinstance(item, Delta):
                lp = lps[i].add([t.token for t in item.tokens], [t.logprob for t in item.tokens]) \
                    if job.top_logprobs is not None else None
                yield sse(head.text_chunk(item.text, include_usage=include_usage, index=i, logprobs=lp))
                continue
            finished[i] = item
            if job.prompt_logprobs:
                prompt_lp = CompletionLogprobs(texts).add(job.prompt_ids, item.prompt_logprobs)
                yield sse(head.text_chunk("", include_usage=include_usage, index=i, logprobs=prompt_lp))
            yield sse(head.text_chunk("", item.finish_reason, include_usage=include_usage, index=i))
    except Exception as e:
        yield _error_event(e)
        return
    if include_usage:
        yield sse(head.usage_chunk("text_completion", usage(finished, n)))
    yield "data: [DONE]\n\n"
