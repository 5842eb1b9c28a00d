"""Requests -> worker jobs: the checks a request must pass (model, unsupported parameters, token ids,
context length), its prompt as token ids (tools rendered by the chat format), and one Job per choice
with its sampling, limits, penalties, logprobs and grammar constraint. Every refusal is an APIError, answered as OpenAI's error JSON by the app."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from torchchat.errors import ChatTemplateError
from torchchat.generation.batch import Penalties
from torchchat.generation.engine import GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.server import structured, tools
from torchchat.server.prompt import completion_prompt_ids
from torchchat.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from torchchat.server.responses import CompletionChoice
from torchchat.server.served import ListedModel, ServedModel
from torchchat.server.worker import Job

log = logging.getLogger("torchchat.server")


class APIError(Exception):
    """Answered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def check_model(name: str | None, served: ServedModel, other_models: Callable[[], list[ListedModel]]) -> None:
    # Any name that is not another model we know of is served by the loaded one (clients often
    # send a fixed name); naming a different downloaded model is an error rather than a surprise.
    if name is None or name == served.id or name in served.aliases:
        return
    if any(name == m.id or name in m.aliases for m in other_models()):
        raise APIError(404, f"The model '{name}' is downloaded but not loaded; this server serves "
                            f"'{served.id}'. Restart the server with that model to use it.",
                       param="model", code="model_not_found")


def check_supported(body: SamplingFields, vocab_size: int) -> None:
    bad = body.unsupported()
    if bad is not None:
        raise APIError(400, f"Unsupported parameter: {bad[0]}: {bad[1]}.", param=bad[0],
                       code="unsupported_parameter")
    for key in body.logit_bias or {}:
        if int(key) >= vocab_size:
            raise APIError(400, f"Invalid request: logit_bias: token id {key} is outside the vocabulary "
                                f"(0..{vocab_size - 1})", param="logit_bias", code="invalid_value")


def sampling_params(body: SamplingFields) -> SamplingParams:
    """OpenAI's top_p 0 means greedy; top_p 1 and top_k 0 mean no cut."""
    if body.top_p == 0.0:
        return SamplingParams(temperature=body.temperature, top_k=1, top_p=None)
    return SamplingParams(temperature=body.temperature, top_k=body.top_k or None,
                          top_p=body.top_p if body.top_p < 1.0 else None)


def jobs_for(body: SamplingFields, prompt_ids: list[int], param: str, context: int,
             stop_ids: frozenset[int] | None = None, prompt_logprobs: bool = False) -> list[Job]:
    """One job per choice (n); choice i samples with seed + i, so choices differ and repeat.
    `context`: positions in the KV cache, which prompt and completion must fit."""
    n = len(prompt_ids)
    if n == 0:
        raise APIError(400, "The prompt is empty; give at least one token.", param=param)
    if n >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the "
                            f"prompt has {n} tokens (it must leave room for at least one generated "
                            "token). Shorten it, or restart the server with a larger --max-seq-length.",
                       param=param, code="context_length_exceeded")
    room = context - n
    limit = min(body.token_limit or room, room)  # beyond the context the answer ends with "length"
    gen = GenerationConfig(max_new_tokens=limit, sampling=sampling_params(body), stop_ids=stop_ids)
    penalties = Penalties(body.presence_penalty, body.frequency_penalty, body.repetition_penalty)
    bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
    return [Job(prompt_ids=prompt_ids, cfg=gen, stop=body.stop_list,
                seed=None if body.seed is None else body.seed + i, penalties=penalties, logit_bias=bias,
                top_logprobs=body.logprob_count, prompt_logprobs=prompt_logprobs)
            for i in range(body.n)]


async def chat_jobs(body: ChatCompletionRequest, served: ServedModel) -> list[Job]:
    """The messages (and tools) through the model's chat format, then one job per choice, each
    constrained by the request's grammar if it asks for one."""
    messages = tools.chat_messages(body)
    try:
        # Tokenizing a long prompt takes seconds: in a thread, so /health and other requests are served.
        prompt_ids = await run_tokenizer(served.chat_format.encode, served.tokenizer, messages, True,
                                         tools.tool_list(body))
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from e
    return await constrained(body, jobs_for(body, prompt_ids, "messages", served.context, served.chat_stop_ids),
                             served)


async def constrained(body: SamplingFields, jobs: list[Job], served: ServedModel) -> list[Job]:
    """The jobs with the grammar of response_format or of a forced tool call (structured.py)."""
    try:
        return await structured.constrain(jobs, body, served.tokenizer, served.chat_format.tool_style)
    except structured.InvalidRequest as e:
        raise APIError(400, f"Invalid request: {e.param}: {e}", param=e.param, code="invalid_value") from e


async def completion_jobs(body: CompletionRequest,
                          served: ServedModel) -> tuple[list[Job], list[CompletionChoice]]:
    """n jobs per prompt, in order, and beside each job its prompt's text (for echo)."""
    tok = served.tokenizer
    jobs: list[Job] = []
    choices: list[CompletionChoice] = []
    for prompt in body.prompts:
        if isinstance(prompt, list):
            bad = [i for i in prompt if not 0 <= i < tok.vocab_size]
            if bad:
                raise APIError(400, f"Invalid request: prompt: token id {bad[0]} is outside the vocabulary "
                                    f"(0..{tok.vocab_size - 1})", param="prompt", code="invalid_value")
        text = prompt if isinstance(prompt, str) else await run_tokenizer(tok.decode, prompt)
        prompt_ids = await run_tokenizer(completion_prompt_ids, tok, prompt)
        for job in jobs_for(body, prompt_ids, "prompt", served.context,
                            prompt_logprobs=body.echo and body.logprobs is not None):
            jobs.append(job)
            choices.append(CompletionChoice(text, body.echo))
    return await constrained(body, jobs, served), choices


async def run_tokenizer(fn, *args):
    """Run a tokenizer call in a thread (a long prompt takes seconds; the loop must stay free). A
    native tokenizer can fail with a BaseException (tiktoken's Rust panics are pyo3 PanicExceptions),
    which FastAPI's handlers would answer with a plain-text 500: it becomes an OpenAI JSON error."""
    try:
        return await asyncio.to_thread(fn, *args)
    except (Exception, asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        log.error("tokenizer failed", exc_info=e)
        raise APIError(500, f"The tokenizer failed on this input: {type(e).__name__}: {str(e)[:200]}",
                       type_="server_error") from None
