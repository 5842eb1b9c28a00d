"""One server-sent-event stream for both /v1/chat/completions and /v1/completions: the jobs' items
merged as they come, each turned into chunks by the endpoint's `Chunks` (responses.py), then the
usage chunk if asked for and `[DONE]`. Non-streamed requests are collected whole, and given up when
the client disconnects."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Protocol, Sequence

from fastapi.responses import StreamingResponse

from torchchat.server import protocol
from torchchat.server.choices import Collected, collect_all, merged
from torchchat.server.worker import Delta, Finished, Job, ModelWorker

log = logging.getLogger("torchchat.server")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Chunks(Protocol):
    """An endpoint's chunk bodies for choice i (the index of its job)."""

    def opening(self, i: int) -> list[dict[str, Any]]: ...  # before any text
    def delta(self, i: int, item: Delta) -> dict[str, Any] | None: ...  # None: nothing to send yet
    def finish(self, i: int, item: Finished) -> list[dict[str, Any]]: ...
    def usage(self, finished: Sequence[Finished]) -> dict[str, Any]: ...  # the extra last chunk


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def events(worker: ModelWorker, jobs: Sequence[Job], chunks: Chunks,
                 include_usage: bool) -> AsyncIterator[str]:
    for i in range(len(jobs)):
        for obj in chunks.opening(i):
            yield sse(obj)
    finished: list[Finished | None] = [None] * len(jobs)
    try:
        async for i, item in merged(worker, jobs):
            if isinstance(item, Delta):
                chunk = chunks.delta(i, item)
                if chunk is not None:
                    yield sse(chunk)
                continue
            finished[i] = item
            for obj in chunks.finish(i, item):
                yield sse(obj)
    except Exception as e:  # headers are sent: report the failure in the stream, as OpenAI does
        log.error("generation failed", exc_info=e)
        yield sse(protocol.error_body(f"generation failed: {e}", type_="server_error"))
        return
    if include_usage:
        yield sse(chunks.usage(finished))
    yield "data: [DONE]\n\n"


def event_stream(worker: ModelWorker, jobs: Sequence[Job], chunks: Chunks,
                 include_usage: bool) -> StreamingResponse:
    return StreamingResponse(events(worker, jobs, chunks, include_usage), media_type="text/event-stream",
                             headers=_SSE_HEADERS)


async def collect(request, worker: ModelWorker, jobs: list[Job]) -> list[Collected] | None:
    """Run the jobs to the end; None if the client disconnected first (they are then cancelled).
    `request`: the route's starlette Request."""
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
