"""Request bodies under a size limit and a time limit, before any route sees them (pure ASGI).

Without them one client can hold the server: a 50 MB body is parsed and tokenized in full, and a
connection that sends its headers and then stalls (or dribbles its body) is held open for as long
as it likes. Here a body larger than `max_bytes` is answered 413 (at once when Content-Length says
so, else as soon as the bytes read pass the limit), and one not complete within `timeout_s` of the
request's start is answered 408; both as OpenAI-style JSON errors, and the connection is closed.
The body read here is then handed to the application as one message; later `receive()` calls go
to the server as before (routes use them to notice a client disconnecting)."""
from __future__ import annotations

import asyncio
import json

from torchchat.server import protocol

DEFAULT_MAX_BYTES = 8 << 20  # 8 MiB: a 128K-token context is well under 1 MB of text
DEFAULT_TIMEOUT_S = 30.0
_NO_BODY = {"GET", "HEAD", "OPTIONS", "DELETE"}


async def _answer(send, status: int, message: str, code: str) -> None:
    body = json.dumps(protocol.error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def _too_large(self, send, size: int | None = None):
        what = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"
        return _answer(send, 413, f"The request body is {what}; this server accepts at most {self.max_bytes} bytes "
                                  "(its --max-request-bytes).", "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in _NO_BODY:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _answer(send, 400, f"Invalid Content-Length {length[:40]!r}.", "invalid_value")
            if declared > self.max_bytes:
                return await self._too_large(send, declared)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await _answer(send, 408, f"The request body did not arrive within {self.timeout_s:g} s; "
                                                "send the whole body at once.", "request_timeout")
            if message["type"] == "http.disconnect":
                return  # the client went away before finishing its request
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            if pending:
                return pending.pop()
            return await receive()

        await self.app(scope, replay, send)
