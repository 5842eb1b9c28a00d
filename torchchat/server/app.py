"""The FastAPI application: OpenAI-compatible routes over a ModelWorker, and the chat page at `/`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health,
GET /metrics (Prometheus), POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's, see
tokenize.py), GET / (the page) and /static/*. Requests become jobs for the continuous-batching worker
(worker.py); n choices and prompt batches in choices.py, response bodies in responses.py. Errors are OpenAI's JSON ({"error": {...}}) with 400 for invalid
requests, 401 without the API key, 404 for unknown models and routes."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from torchchat.generation.batch import Penalties
from torchchat.generation.engine import GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.server import limits, protocol, responses
from torchchat.errors import ChatTemplateError
from torchchat.server import structured, tools
from torchchat.server.choices import Collected, collect_all
from torchchat.server.logprobs import TokenTexts
from torchchat.server.prompt import completion_prompt_ids
from torchchat.server.protocol import ChatCompletionRequest, CompletionRequest, Head, SamplingFields
from torchchat.server.worker import Job, ModelWorker

log = logging.getLogger("torchchat.server")

STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class ListedModel:
    id: str
    created: int  # Unix seconds
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServedModel:
    """What the routes need to know about the loaded model."""

    id: str
    tokenizer: object  # torchchat.tokenizer.Tokenizer
    chat_format: object  # torchchat.generation.chat_format.ChatFormat: messages -> prompt ids
    chat_stop_ids: frozenset[int]  # the format's end-of-turn ids plus the tokenizer's own
    context: int  # positions in the KV cache: prompt + completion must fit
    fingerprint: str
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=protocol.now)


class APIError(Exception):
    """Answered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, **kw), status_code=status)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(worker: ModelWorker, served: ServedModel, *, api_key: str | None = None,
               other_models: Callable[[], list[ListedModel]] = list,
               on_ready: Callable[[], None] | None = None,
               max_request_bytes: int = limits.DEFAULT_MAX_BYTES,
               body_timeout_s: float = limits.DEFAULT_TIMEOUT_S) -> FastAPI:
    """The application. `other_models` lists downloaded models besides the loaded one (for
    /v1/models); `on_ready` runs once the server accepts requests. Request bodies larger than
    `max_request_bytes`, or not complete within `body_timeout_s`, are refused (server/limits.py)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        worker.close()

    app = FastAPI(title="torchchat", version=protocol.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(limits.BodyLimits, max_bytes=max_request_bytes, timeout_s=body_timeout_s)
    tok = served.tokenizer
    texts = TokenTexts(tok)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, type_=e.type, param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        # Of a union's failed alternatives, the deepest location is the one the client meant (a list
        # of parts with a bad part, rather than "not a string").
        first = max(e.errors(), key=lambda err: len(err.get("loc", ())))
        if first.get("type") == "json_invalid":
            return _error(400, "We could not parse the JSON body of your request: "
                               f"{first.get('ctx', {}).get('error', first.get('msg'))}. Send valid JSON.")
        param = protocol.error_param(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        where = f"{param}: " if param else ""
        return _error(400, f"Invalid request: {where}{msg}", param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, str(e.detail), code=code)

    @app.exception_handler(Exception)
    async def _crash(_request: Request, e: Exception) -> JSONResponse:
        log.error("request failed", exc_info=e)
        return _error(500, f"The server failed: {type(e).__name__}: {e}", type_="server_error")

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "Incorrect API key provided" if token else "Missing API key"
            raise APIError(401, f"{what}: send the server's --api-key as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        # Any name that is not another model we know of is served by the loaded one (clients often
        # send a fixed name); naming a different downloaded model is an error rather than a surprise.
        if name is None or name == served.id or name in served.aliases:
            return
        if any(name == m.id or name in m.aliases for m in other_models()):
            raise APIError(404, f"The model '{name}' is downloaded but not loaded; this server serves "
                                f"'{served.id}'. Restart the server with that model to use it.",
                           param="model", code="model_not_found")

    def check_supported(body: SamplingFields) -> None:
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, f"Unsupported parameter: {bad[0]}: {bad[1]}.", param=bad[0],
                           code="unsupported_parameter")
        for key in body.logit_bias or {}:
            if int(key) >= tok.vocab_size:
                raise APIError(400, f"Invalid request: logit_bias: token id {key} is outside the vocabulary "
                                    f"(0..{tok.vocab_size - 1})", param="logit_bias", code="invalid_value")

    def jobs_for(body: SamplingFields, prompt_ids: list[int], param: str,
                 stop_ids: frozenset[int] | None = None, prompt_logprobs: bool = False) -> list[Job]:
        """One job per choice (n); choice i samples with seed + i, so choices differ and repeat."""
        n = len(prompt_ids)
        if n == 0:
            raise APIError(400, "The prompt is empty; give at least one token.", param=param)
        if n >= served.context:
            raise APIError(400, f"This model's maximum context length is {served.context} tokens, but the "
                                f"prompt has {n} tokens (it must leave room for at least one generated "
                                "token). Shorten it, or restart the server with a larger --max-seq-length.",
                           param=param, code="context_length_exceeded")
        room = served.context - n
        limit = min(body.token_limit or room, room)  # beyond the context the answer ends with "length"
        if body.top_p == 0.0:
            sampling = SamplingParams(temperature=body.temperature, top_k=1, top_p=None)
        else:
            sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k or None,
                                      top_p=body.top_p if body.top_p < 1.0 else None)
        cfg = GenerationConfig(max_new_tokens=limit, sampling=sampling, stop_ids=stop_ids)
        penalties = Penalties(body.presence_penalty, body.frequency_penalty, body.repetition_penalty)
        bias = {int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None
        return [Job(prompt_ids=prompt_ids, cfg=cfg, stop=body.stop_list,
                    seed=None if body.seed is None else body.seed + i, penalties=penalties, logit_bias=bias,
                    top_logprobs=body.logprob_count, prompt_logprobs=prompt_logprobs)
                for i in range(body.n)]

    async def constrained(body: SamplingFields, jobs: list[Job]) -> list[Job]:
        """Jobs with the grammar of response_format / a forced tool call (server/structured.py)."""
        try:
            return await structured.constrain(jobs, body, tok, served.chat_format.tool_style)
        except structured.InvalidRequest as e:
            raise APIError(400, f"Invalid request: {e.param}: {e}", param=e.param, code="invalid_value") from e

    async def collect(request: Request, jobs: list[Job]) -> list[Collected] | None:
        """Run the jobs to the end; None if the client disconnected first (they are then cancelled)."""
        handler = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            # After the body has been read, receive() returns only when the client disconnects.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()
            handler.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await collect_all(worker, jobs)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            handler.uncancel()
            return None
        finally:
            watcher.cancel()

    def stream_response(chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.id, "context_length": served.context,
                **worker.stats.snapshot()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        snap = worker.stats.snapshot()
        text = worker.metrics.render(snap["queued"], snap["active"], snap["completed"], snap["cancelled"])
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict:
        listed = [ListedModel(served.id, served.created)]
        listed += [m for m in other_models() if m.id != served.id]
        return {"object": "list", "data": [_model_card(m) for m in listed]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict:
        if model_id in (served.id, *served.aliases):
            return _model_card(ListedModel(served.id, served.created))
        for m in other_models():
            if m.id == model_id:
                return _model_card(m)
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_supported(body)
        messages = tools.chat_messages(body)
        try:
            # Tokenizing a long prompt takes seconds: in a thread, so /health and other requests are served.
            prompt_ids = await _tokenize(served.chat_format.encode, tok, messages, True, tools.tool_list(body))
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        jobs = await constrained(body, jobs_for(body, prompt_ids, "messages", served.chat_stop_ids))
        head = Head(protocol.new_id("chatcmpl"), served.id, served.fingerprint)
        tool_use = tools.ToolUse.of(body, served.chat_format.tool_style)
        if body.stream:
            return stream_response(responses.chat_events(head, worker, jobs, texts, body.include_usage, tool_use))
        results = await collect(request, jobs)
        if results is None:
            return Response(status_code=499)
        return JSONResponse(responses.chat_body(head, jobs, results, texts, tool_use))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_supported(body)
        jobs: list[Job] = []
        meta: list[responses.CompletionChoice] = []
        for prompt in body.prompts:
            if isinstance(prompt, list):
                bad = [i for i in prompt if not 0 <= i < tok.vocab_size]
                if bad:
                    raise APIError(400, f"Invalid request: prompt: token id {bad[0]} is outside the vocabulary "
                                        f"(0..{tok.vocab_size - 1})", param="prompt", code="invalid_value")
            text = prompt if isinstance(prompt, str) else await _tokenize(tok.decode, prompt)
            prompt_ids = await _tokenize(completion_prompt_ids, tok, prompt)
            for job in jobs_for(body, prompt_ids, "prompt", prompt_logprobs=body.echo and body.logprobs is not None):
                jobs.append(job)
                meta.append(responses.CompletionChoice(text, body.echo))
        jobs = await constrained(body, jobs)
        head = Head(protocol.new_id("cmpl"), served.id, served.fingerprint)
        if body.stream:
            return stream_response(responses.completion_events(head, worker, jobs, meta, texts, body.n,
                                                               body.include_usage))
        results = await collect(request, jobs)
        if results is None:
            return Response(status_code=499)
        return JSONResponse(responses.completion_body(head, jobs, meta, results, texts, body.n))

    from torchchat.server import tokenize

    tokenize.add_routes(app, tok, served.context, [Depends(authorize)],
                        lambda message, param: APIError(400, f"Invalid request: {param}: {message}", param=param))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _tokenize(fn, *args):
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


def _model_card(m: ListedModel) -> dict:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": "torchchat"}


def downloaded_models(model_directory: Path) -> list[ListedModel]:
    """Registry models whose folder exists under `model_directory`, newest first."""
    from torchchat.model.registry import known_models

    found = []
    for entry in known_models():
        folder = entry.local_dir(model_directory)
        if folder.is_dir():
            found.append(ListedModel(entry.name, int(folder.stat().st_mtime), entry.aliases))
    return sorted(found, key=lambda m: -m.created)
