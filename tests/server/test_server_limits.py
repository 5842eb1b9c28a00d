"""The server under abuse: oversized and stalled bodies, a long prompt (tokenized off the event loop,
so /health stays quick), seeds beyond 64 bits, lone surrogates, an API key given with spaces."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from tests.server.conftest import API_KEY
from tests.server.test_server_http import assert_openai_error, request

pytest.importorskip("fastapi")


def _read_response(s: socket.socket) -> str:
    """One whole HTTP/1.1 response: the head, then Content-Length bytes of body (they may come in
    separate TCP segments, so one recv is not enough), or everything until the server closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is None or len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_body_over_the_limit_is_413_before_it_is_read(api_server):
    with socket.create_connection(api_server.host_port, timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100000000\r\n\r\n")
        reply = _read_response(s)
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), reply
    assert json.loads(body)["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("seed", [1 << 64, -(1 << 63) - 1, 10 ** 30])
def test_seed_beyond_64_bits_is_400(api_server, seed):
    status, body = request(api_server, "POST", "/v1/completions",
                           raw=b'{"prompt": "Once", "max_tokens": 2, "seed": %d}' % seed)
    assert_openai_error(status, body, 400, param="seed")


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     None),
    ("/v1/completions", b'{"prompt": "x\\ud83d"}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"]}', None),
])
def test_lone_surrogates_are_400(api_server, path, raw, param):
    status, body = request(api_server, "POST", path, raw=raw)
    assert_openai_error(status, body, 400, param=param)
    assert "surrogate" in body["error"]["message"]


def test_health_answers_while_a_long_prompt_is_tokenized(api_server):
    prompt = "Once upon a time there was a little girl. " * 150_000  # 6.3 MB: seconds to tokenize
    done = threading.Event()
    result = {}

    def post():
        result["reply"] = request(api_server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        done.set()

    t = threading.Thread(target=post)
    t.start()
    time.sleep(0.3)  # the body is sent (loopback) and being tokenized, which takes seconds
    # No timed threshold (the machine may be slow or busy): /health must come back while the long
    # request is still unanswered, which a tokenizer holding the event loop would not allow.
    api_server.health()
    still_busy = not done.is_set()
    t.join(120)
    status, body = result["reply"]
    assert_openai_error(status, body, 400, param="prompt")  # longer than the context
    assert still_busy, "the long prompt was answered before /health: the loop was held, or the prompt is too short"


def _run_middleware(messages, max_bytes=1000, timeout_s=0.3, headers=()):
    """Drive BodyLimits with scripted receive() messages (a None: never arrives); returns (status,
    body the app saw or None)."""
    from torchchat.server.limits import BodyLimits

    seen, sent = {}, []

    async def app(scope, receive, send):
        seen["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        if not messages:
            await asyncio.sleep(3600)
        item = messages.pop(0)
        if item is None:
            await asyncio.sleep(3600)
        return item

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": list(headers)}
    asyncio.run(BodyLimits(app, max_bytes=max_bytes, timeout_s=timeout_s)(scope, receive, send))
    return sent[0]["status"], seen.get("body")


def test_body_in_pieces_reaches_the_app_whole():
    msgs = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"cd"}]
    assert _run_middleware(msgs) == (200, b"abcd")


def test_body_that_stalls_is_408():
    start = time.monotonic()
    assert _run_middleware([{"type": "http.request", "body": b"ab", "more_body": True}, None]) == (408, None)
    assert time.monotonic() - start < 2


def test_chunked_body_over_the_limit_is_413():
    msgs = [{"type": "http.request", "body": b"x" * 600, "more_body": True},
            {"type": "http.request", "body": b"x" * 600, "more_body": True}]
    assert _run_middleware(msgs) == (413, None)


def test_declared_length_over_the_limit_is_413_unread():
    assert _run_middleware([], headers=[(b"content-length", b"5000")]) == (413, None)


def test_api_key_with_spaces_is_stripped_at_startup():
    from torchchat.cli import build_parser
    from torchchat.cli.server import server_options

    args = build_parser("server").parse_args(["server", "--api-key", "  sk-abc \n", "--dummy-weights"])
    assert server_options(args, open_browser=False).api_key == "sk-abc"


def test_tokenizer_panic_becomes_a_json_error():
    """tiktoken's Rust panics are BaseExceptions, which FastAPI would answer as a plain-text 500."""
    from torchchat.server.request_config import APIError, run_tokenizer

    class PanicException(BaseException):
        pass

    def panics(text):
        raise PanicException("no entry found for key")

    with pytest.raises(APIError) as e:
        asyncio.run(run_tokenizer(panics, "x"))
    assert e.value.status == 500 and "no entry found for key" in e.value.message
