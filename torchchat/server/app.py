"""The FastAPI application: OpenAI-compatible routes over a ModelWorker, and the chat page at `/`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health,
GET / (the page) and /static/*. Errors are OpenAI's JSON ({"error": {...}}) with 400 for invalid
requests, 401 without the API key, 404 for unknown models and routes."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from torchchat.generation.engine import GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.server import protocol
from torchchat.errors import ChatTemplateError
from torchchat.server.prompt import completion_prompt_ids
from torchchat.server.protocol import ChatCompletionRequest, CompletionRequest, Head, SamplingFields
from torchchat.server.worker import Delta, Finished, Job, ModelWorker

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


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(worker: ModelWorker, served: ServedModel, *, api_key: str | None = None,
               other_models: Callable[[], list[ListedModel]] = list,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The application. `other_models` lists downloaded models besides the loaded one (for
    /v1/models); `on_ready` runs once the server accepts requests."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        worker.close()

    app = FastAPI(title="torchchat", version=protocol.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    tok = served.tokenizer

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

    def job_for(body: SamplingFields, prompt_ids: list[int], param: str,
                stop_ids: frozenset[int] | None = None) -> Job:
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
        return Job(prompt_ids=prompt_ids, cfg=cfg,
                   stop=body.stop_list, seed=body.seed)

    async def collect(request: Request, job: Job) -> tuple[str, Finished] | None:
        """Run a job to the end; None if the client disconnected first (the job is then cancelled)."""
        handler = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            # After the body has been read, receive() returns only when the client disconnects.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()
            handler.cancel()

        watcher = asyncio.create_task(watch())
        parts: list[str] = []
        try:
            async for item in worker.run(job):
                if isinstance(item, Delta):
                    parts.append(item.text)
                else:
                    return "".join(parts), item
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            handler.uncancel()
            return None
        finally:
            watcher.cancel()
        raise RuntimeError("the worker ended without a Finished record")

    async def events(job: Job) -> AsyncIterator[Delta | Finished | APIError]:
        try:
            async for item in worker.run(job):
                yield item
        except Exception as e:  # headers are sent: report the failure in the stream, as OpenAI does
            log.exception("generation failed")
            yield APIError(500, f"generation failed: {e}", type_="server_error")

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
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            prompt_ids = served.chat_format.encode(tok, messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from e
        job = job_for(body, prompt_ids, "messages", served.chat_stop_ids)
        head = Head(protocol.new_id("chatcmpl"), served.id, served.fingerprint)
        if not body.stream:
            done = await collect(request, job)
            if done is None:
                return Response(status_code=499)
            text, fin = done
            return JSONResponse(head.chat_completion(text, fin.finish_reason, _usage(fin)))

        usage = body.include_usage

        async def chunks() -> AsyncIterator[str]:
            yield _sse(head.chat_chunk({"role": "assistant", "content": ""}, include_usage=usage))
            async for item in events(job):
                if isinstance(item, Delta):
                    yield _sse(head.chat_chunk({"content": item.text}, include_usage=usage))
                elif isinstance(item, Finished):
                    yield _sse(head.chat_chunk({}, item.finish_reason, include_usage=usage))
                    if usage:
                        yield _sse(head.usage_chunk("chat.completion.chunk", _usage(item)))
                else:
                    yield _sse(protocol.error_body(item.message, type_=item.type))
                    return
            yield "data: [DONE]\n\n"

        return stream_response(chunks())

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            bad = [i for i in prompt if not 0 <= i < tok.vocab_size]
            if bad:
                raise APIError(400, f"Invalid request: prompt: token id {bad[0]} is outside the vocabulary "
                                    f"(0..{tok.vocab_size - 1})", param="prompt", code="invalid_value")
        job = job_for(body, completion_prompt_ids(tok, prompt), "prompt")
        echo = (prompt if isinstance(prompt, str) else tok.decode(prompt)) if body.echo else ""
        head = Head(protocol.new_id("cmpl"), served.id, served.fingerprint)
        if not body.stream:
            done = await collect(request, job)
            if done is None:
                return Response(status_code=499)
            text, fin = done
            return JSONResponse(head.text_completion(echo + text, fin.finish_reason, _usage(fin)))

        usage = body.include_usage

        async def chunks() -> AsyncIterator[str]:
            if echo:
                yield _sse(head.text_chunk(echo, include_usage=usage))
            async for item in events(job):
                if isinstance(item, Delta):
                    yield _sse(head.text_chunk(item.text, include_usage=usage))
                elif isinstance(item, Finished):
                    yield _sse(head.text_chunk("", item.finish_reason, include_usage=usage))
                    if usage:
                        yield _sse(head.usage_chunk("text_completion", _usage(item)))
                else:
                    yield _sse(protocol.error_body(item.message, type_=item.type))
                    return
            yield "data: [DONE]\n\n"

        return stream_response(chunks())

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _usage(fin: Finished) -> dict[str, int]:
    return protocol.usage(fin.prompt_tokens, fin.completion_tokens)


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
