"""Raw HTTP against the server: malformed bodies, wrong types, auth, disconnects and concurrency."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from tests.server.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
PROMPTS = [
    "Once upon a time",
    "Lily and Tom went to the park. They",
    "The cat",
    "One day, a little bird named Blue flew over the big green hill and saw",
    "Tim had a red ball.",
    "There was a dog who liked to",
    "Mom said,",
    "The sun was hot and the children wanted to swim in the lake, so they",
]


def request(server, method: str, path: str, body=None, headers=AUTH, raw: bytes | None = None):
    """(status, parsed JSON or text) of one request."""
    conn = http.client.HTTPConnection(*server.host_port, timeout=120)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode()
        ctype = resp.getheader("content-type", "")
        return resp.status, json.loads(text) if ctype.startswith("application/json") else text
    finally:
        conn.close()


def sse_events(resp) -> list[dict]:
    """Read a whole event stream; checks it ends with [DONE]."""
    events, done = [], False
    for line in resp.read().decode().split("\n"):
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        events.append(json.loads(payload))
    assert done, "the stream did not end with data: [DONE]"
    return events


def stream_chat(server, prompt: str, max_tokens: int) -> str:
    conn = http.client.HTTPConnection(*server.host_port, timeout=120)
    try:
        body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=AUTH)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
        return "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(resp))
    finally:
        conn.close()


def assert_openai_error(status, body, expected_status, param=None):
    assert status == expected_status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_malformed_json(api_server):
    status, body = request(api_server, "POST", "/v1/chat/completions", raw=b'{"messages": [{"role": "us')
    assert_openai_error(status, body, 400)
    assert "JSON" in body["error"]["message"]


@pytest.mark.parametrize("field, value, param", [
    ("temperature", "hot", "temperature"),
    ("temperature", -1, "temperature"),
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", 1.5, "max_tokens"),
    ("top_p", 2, "top_p"),
    ("top_k", -3, "top_k"),
    ("stream", "yes", "stream"),
    ("stop", 5, "stop"),
    ("stop", [str(i) for i in range(17)], "stop"),
    ("seed", "7", "seed"),
    ("n", 0, "n"),
    ("n", 17, "n"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("logit_bias", {"x": 1}, "logit_bias"),
    ("logit_bias", {"5": 101}, "logit_bias"),
    ("logit_bias", {"999999": 1}, "logit_bias"),
    ("top_logprobs", 3, None),  # needs logprobs: true
    ("response_format", {"type": "xml"}, "response_format.type"),
    ("tools", [{"type": "function", "function": {"name": "not a name"}}], "tools.0.function.name"),
    ("tool_choice", "always", "tool_choice"),
    ("messages", "hello", "messages"),
    ("messages", [], "messages"),
    ("messages", [{"role": "wizard", "content": "hi"}], "messages.0.role"),
    ("messages", [{"role": "user", "content": 5}], "messages.0.content"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages.0.content.0.type"),
    ("stream_options", {"include_usage": True}, None),  # only allowed with stream: true
])
def test_wrong_types_and_values_are_400(api_server, field, value, param):
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    status, out = request(api_server, "POST", "/v1/chat/completions", body)
    assert_openai_error(status, out, 400, param)


def test_completions_validation(api_server):
    status, out = request(api_server, "POST", "/v1/completions", {"prompt": [], "max_tokens": 2})
    assert_openai_error(status, out, 400, "prompt")
    status, out = request(api_server, "POST", "/v1/completions", {"prompt": [1, 99999], "max_tokens": 2})
    assert_openai_error(status, out, 400, "prompt")
    status, out = request(api_server, "POST", "/v1/completions", {"max_tokens": 2})
    assert_openai_error(status, out, 400, "prompt")


def test_unknown_fields_are_ignored(api_server):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi", "name": "me"}], "max_tokens": 3,
            "temperature": 0, "presence_penalty": 0.5, "logit_bias": {"1": 2}, "user": "u", "whatever": [1, 2]}
    status, out = request(api_server, "POST", "/v1/chat/completions", body)
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 3


def test_over_long_prompt_names_the_context(api_server):
    status, out = request(api_server, "POST", "/v1/completions", {"prompt": "The cat sat. " * 300, "max_tokens": 2})
    assert_openai_error(status, out, 400, "prompt")
    assert "512" in out["error"]["message"] and out["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json"},
    {"Content-Type": "application/json", "Authorization": "Bearer sk-wrong"},
    {"Content-Type": "application/json", "Authorization": API_KEY},  # no "Bearer"
])
def test_missing_or_wrong_key_is_401(api_server, headers):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path, b in (("POST", "/v1/chat/completions", body), ("POST", "/v1/completions", {"prompt": "a"}),
                            ("GET", "/v1/models", None)):
        status, out = request(api_server, method, path, b, headers=headers)
        assert_openai_error(status, out, 401)
    status, out = request(api_server, "GET", "/health", headers=headers)
    assert status == 200 and out["status"] == "ok"


def test_unknown_route_is_openai_404(api_server):
    status, out = request(api_server, "GET", "/v1/nothing-here")
    assert_openai_error(status, out, 404)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_client_disconnect_mid_stream_frees_the_model(api_server):
    before = api_server.wait_idle()
    sock = socket.create_connection(api_server.host_port, timeout=60)
    body = json.dumps({"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 500,
                       "temperature": 0, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    received = b""
    while received.count(b"data: ") < 3:  # a few streamed chunks: generation is under way
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    with api_server.paused():  # the 500 tokens cannot all be generated before the close arrives
        sock.close()
    # The job stops at its next token: counted as cancelled, not completed, and the model is free for
    # the next request.
    _wait_for(lambda: api_server.health()["cancelled"] == before["cancelled"] + 1, 10, "the stream to be cancelled")
    after = api_server.wait_idle(10)
    assert after["completed"] == before["completed"]
    assert stream_chat(api_server, "The cat", 5)


def test_client_disconnect_while_waiting_for_a_full_response(api_server):
    before = api_server.wait_idle()
    sock = socket.create_connection(api_server.host_port, timeout=60)
    body = json.dumps({"prompt": [1], "max_tokens": 500, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    _wait_for(lambda: api_server.health()["active"] == 1, 10, "generation to start")
    with api_server.paused():
        sock.close()
    _wait_for(lambda: api_server.health()["cancelled"] == before["cancelled"] + 1, 10, "the request to be cancelled")
    assert api_server.wait_idle(10)["completed"] == before["completed"]


def test_concurrent_streams_equal_sequential_runs(api_server):
    # Greedy, different prompt lengths and budgets: if requests shared or clobbered the KV cache, the
    # concurrent outputs would differ from those of the same requests run one at a time.
    budgets = [24, 9, 31, 17, 24, 12, 28, 20]
    sequential = [stream_chat(api_server, p, n) for p, n in zip(PROMPTS, budgets)]
    concurrent: list[str | BaseException | None] = [None] * len(PROMPTS)
    peak_active = 0

    def worker(i: int) -> None:
        try:
            concurrent[i] = stream_chat(api_server, PROMPTS[i], budgets[i])
        except BaseException as e:  # reported by the main thread
            concurrent[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak_active = max(peak_active, api_server.health()["active"])
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert concurrent == sequential
    assert len(set(sequential)) == len(PROMPTS)
    assert peak_active >= 2  # they really ran together


def test_a_dropped_stream_leaves_the_streams_beside_it_unchanged(api_server):
    # A client that goes away mid-generation frees its slot while others decode in the same batch;
    # their greedy outputs are those of the same requests run alone.
    budgets = [40, 25, 33]
    expected = [stream_chat(api_server, p, n) for p, n in zip(PROMPTS[:3], budgets)]
    before = api_server.wait_idle()
    sock = socket.create_connection(api_server.host_port, timeout=60)
    body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 500,
                       "temperature": 0, "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(4096)
    got: list[str | BaseException | None] = [None] * 3

    def client(i: int) -> None:
        try:
            got[i] = stream_chat(api_server, PROMPTS[i], budgets[i])
        except BaseException as e:  # reported by the main thread
            got[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    with api_server.paused():  # the others are sent and the long stream dropped while the server is frozen
        for t in threads:
            t.start()
        time.sleep(0.2)
        sock.close()
    for t in threads:
        t.join()
    assert got == expected
    _wait_for(lambda: api_server.health()["cancelled"] == before["cancelled"] + 1, 10, "the stream to be cancelled")
    assert api_server.wait_idle(10)["completed"] == before["completed"] + 3
