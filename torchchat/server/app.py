"""The FastAPI application: OpenAI-compatible routes over a ModelWorker, and the chat page at `/`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health,
GET /metrics (Prometheus), POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's, see
tokenize.py), GET / (the page) and /static/*. This module holds the routes only: requests become jobs
for the continuous-batching worker (worker.py) in request_config.py, n choices and prompt batches run
in choices.py, response bodies and stream chunks are responses.py's, the event stream streaming.py's,
the models served.py's. Errors are OpenAI's JSON ({"error": {...}}) with 400 for invalid requests,
401 without the API key, 404 for unknown models and routes."""
from __future__ import annotations

import contextlib
import hmac
import logging
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from torchchat.server import limits, protocol, responses, streaming
from torchchat.server.logprobs import TokenTexts
from torchchat.server.protocol import ChatCompletionRequest, CompletionRequest, Head
from torchchat.server.request_config import APIError, chat_jobs, check_model, check_supported, completion_jobs
from torchchat.server.served import ListedModel, ServedModel, model_card
from torchchat.server.tools import ToolUse
from torchchat.server.worker import ModelWorker

log = logging.getLogger("torchchat.server")

STATIC = Path(__file__).with_name("static")


def _error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, **kw), status_code=status)


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
        return {"object": "list", "data": [model_card(m) for m in listed]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict:
        if model_id in (served.id, *served.aliases):
            return model_card(ListedModel(served.id, served.created))
        for m in other_models():
            if m.id == model_id:
                return model_card(m)
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model, served, other_models)
        check_supported(body, tok.vocab_size)
        jobs = await chat_jobs(body, served)
        head = Head(protocol.new_id("chatcmpl"), served.id, served.fingerprint)
        tool_use = ToolUse.of(body, served.chat_format.tool_style)  # None: replies are never read as calls
        if body.stream:
            chunks = responses.ChatChunks(head, jobs, texts, body.include_usage, tool_use)
            return streaming.event_stream(worker, jobs, chunks, body.include_usage)
        results = await streaming.collect(request, worker, jobs)
        if results is None:
            return Response(status_code=499)
        return JSONResponse(responses.chat_body(head, jobs, results, texts, tool_use))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model, served, other_models)
        check_supported(body, tok.vocab_size)
        jobs, prompts = await completion_jobs(body, served)
        head = Head(protocol.new_id("cmpl"), served.id, served.fingerprint)
        if body.stream:
            chunks = responses.CompletionChunks(head, jobs, prompts, texts, body.n, body.include_usage)
            return streaming.event_stream(worker, jobs, chunks, body.include_usage)
        results = await streaming.collect(request, worker, jobs)
        if results is None:
            return Response(status_code=499)
        return JSONResponse(responses.completion_body(head, jobs, prompts, results, texts, body.n))

    from torchchat.server import tokenize

    tokenize.add_routes(app, tok, served.context, [Depends(authorize)],
                        lambda message, param: APIError(400, f"Invalid request: {param}: {message}", param=param))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
