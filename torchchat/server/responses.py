"""Response bodies and stream chunks of /v1/chat/completions and /v1/completions from the worker's
results: one choice per job (n per prompt), logprobs in each endpoint's shape, usage summed over the
choices (the prompt counted once per prompt, as OpenAI does). The stream itself is streaming.py's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torchchat.server import protocol
from torchchat.server.choices import Collected
from torchchat.server.logprobs import CompletionLogprobs, TokenTexts, chat_content, merge
from torchchat.server.protocol import Head
from torchchat.server.tools import ToolUse
from torchchat.server.worker import Delta, Finished, Job


def usage(finished: Sequence[Finished], n: int) -> dict[str, Any]:
    """Summed over choices; each prompt (every n-th job) counted once."""
    prompts = finished[::n]
    return protocol.usage(sum(f.prompt_tokens for f in prompts), sum(f.completion_tokens for f in finished),
                          sum(f.cached_tokens for f in prompts))


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


class ChatChunks:
    """Chat's stream chunks (streaming.Chunks): a role chunk per choice first, then content deltas
    with their logprobs, an empty delta with the finish reason. With `tools`, text that may be a call
    is held back (no chunk while nothing is to be sent); calls come in one tool_calls delta before
    the finish chunk (finish_reason "tool_calls"), held text that was no call as content."""

    def __init__(self, head: Head, jobs: Sequence[Job], texts: TokenTexts, include_usage: bool,
                 tools: ToolUse | None = None):
        self.head, self.jobs, self.texts, self.include_usage = head, jobs, texts, include_usage
        self.prev = [job.prompt_ids[-1] for job in jobs]  # the token before each choice's next delta
        self.splitters = [tools.stream() if tools else None for _ in jobs]

    def opening(self, i: int) -> list[dict[str, Any]]:
        return [self.head.chat_chunk({"role": "assistant", "content": ""}, include_usage=self.include_usage,
                                     index=i)]

    def delta(self, i: int, item: Delta) -> dict[str, Any] | None:
        lp = None
        if self.jobs[i].top_logprobs is not None:
            lp = {"content": chat_content(self.texts, item.tokens, self.prev[i])}
            if item.tokens:
                self.prev[i] = item.tokens[-1].token
        split = self.splitters[i]
        text = split.feed(item.text) if split else item.text
        if split and not text and lp is None:
            return None
        return self.head.chat_chunk({"content": text}, include_usage=self.include_usage, index=i, logprobs=lp)

    def finish(self, i: int, item: Finished) -> list[dict[str, Any]]:
        out, reason, split = [], item.finish_reason, self.splitters[i]
        if split:
            rest, calls = split.finish(complete=reason == "stop")
            if rest:
                out.append(self.head.chat_chunk({"content": rest}, include_usage=self.include_usage, index=i))
            if calls:
                reason = "tool_calls"
                delta = {"tool_calls": [c.openai(index=k) for k, c in enumerate(calls)]}
                out.append(self.head.chat_chunk(delta, include_usage=self.include_usage, index=i))
        out.append(self.head.chat_chunk({}, reason, include_usage=self.include_usage, index=i))
        return out

    def usage(self, finished: Sequence[Finished]) -> dict[str, Any]:
        return self.head.usage_chunk("chat.completion.chunk", usage(finished, len(self.jobs)))


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


def completion_body(head: Head, jobs: Sequence[Job], prompts: Sequence[CompletionChoice], results: Sequence[Collected],
                    texts: TokenTexts, n: int) -> dict[str, Any]:
    choices = []
    for i, (job, c, r) in enumerate(zip(jobs, prompts, results)):
        lp = _completion_logprobs(texts, job, c, r) if job.top_logprobs is not None else None
        text = (c.prompt_text if c.echo else "") + r.text
        choices.append(Head.text_choice(i, text, r.finished.finish_reason, lp))
    return head.text_completion(choices, usage([r.finished for r in results], n))


class CompletionChunks:
    """Completions' stream chunks (streaming.Chunks). With echo, each choice starts with its prompt's
    text; with echo and logprobs, the prompt's logprobs (known once its prefill ends) come in a chunk
    of empty text just before the finish chunk."""

    def __init__(self, head: Head, jobs: Sequence[Job], prompts: Sequence[CompletionChoice], texts: TokenTexts,
                 n: int, include_usage: bool):
        self.head, self.jobs, self.prompts, self.texts, self.n = head, jobs, prompts, texts, n
        self.include_usage = include_usage
        self.lps = [CompletionLogprobs(texts, prev=job.prompt_ids[-1], offset=len(c.prompt_text))
                    for job, c in zip(jobs, prompts)]

    def opening(self, i: int) -> list[dict[str, Any]]:
        c = self.prompts[i]
        return [self.head.text_chunk(c.prompt_text, include_usage=self.include_usage, index=i)] if c.echo else []

    def delta(self, i: int, item: Delta) -> dict[str, Any]:
        lp = self.lps[i].add([t.token for t in item.tokens], [t.logprob for t in item.tokens]) \
            if self.jobs[i].top_logprobs is not None else None
        return self.head.text_chunk(item.text, include_usage=self.include_usage, index=i, logprobs=lp)

    def finish(self, i: int, item: Finished) -> list[dict[str, Any]]:
        job, out = self.jobs[i], []
        if job.prompt_logprobs:
            prompt_lp = CompletionLogprobs(self.texts).add(job.prompt_ids, item.prompt_logprobs)
            out.append(self.head.text_chunk("", include_usage=self.include_usage, index=i, logprobs=prompt_lp))
        out.append(self.head.text_chunk("", item.finish_reason, include_usage=self.include_usage, index=i))
        return out

    def usage(self, finished: Sequence[Finished]) -> dict[str, Any]:
        return self.head.usage_chunk("text_completion", usage(finished, self.n))
