"""A real server process on a free port, serving stories260K, for the server tests."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, shared_path

API_KEY = "sk-torchchat-test"
DOWNLOADED = "meta-llama/Llama-3.2-1B-Instruct"  # alias llama3.2-1b
_READY = re.compile(r"API at (http://[^\s/]+)/v1")


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.base_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def health(self) -> dict:
        with urllib.request.urlopen(self.base_url + "/health", timeout=10) as r:
            return json.loads(r.read())

    @contextmanager
    def paused(self):
        """Freeze the server process (SIGSTOP) for the duration of the block, then let it go on.

        Tests that act in the middle of a generation (disconnect, Stop) freeze the server while they
        act, so the generation cannot finish first however fast the model runs."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """/health once nothing is queued or running."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["active"] == 0 and h["queued"] == 0:
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout} s: {h}")
            time.sleep(0.05)


def stories_args() -> list[str]:
    folder = shared_path("models", "stories260K")
    return ["--checkpoint-path", str(folder / "stories260K.bin"), "--tokenizer-path", str(folder / "tok512.model"),
            "--dtype", "fp32"]


def start_server(command: str, extra: list[str], log: Path, timeout: float = 180.0,
                 model: list[str] | None = None) -> Server:
    """`torchchat.py COMMAND` on a free port (--port 0), serving `model` (its flags; default
    stories260K); returns once it answers /health."""
    for module in ("fastapi", "uvicorn"):
        pytest.importorskip(module, reason="the server needs the server extra: pip install -e '.[server]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    model = stories_args() if model is None else model
    cmd = [sys.executable, str(ROOT / "torchchat.py"), command, *model, "--port", "0", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        match = _READY.search(log.read_text(errors="replace"))
        if match:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            pytest.fail(f"server did not start (exit {proc.returncode}):\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    server = Server(match.group(1), proc, log)
    server.health()
    return server


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """One server with --api-key for every API test module."""
    folder = tmp_path_factory.mktemp("server")
    # A model directory in which one registry model counts as downloaded (its folder exists).
    (folder / "models" / DOWNLOADED).mkdir(parents=True)
    server = start_server("server", ["--api-key", API_KEY, "--model-directory", str(folder / "models")],
                          folder / "server.log")
    try:
        yield server
    finally:
        stop_server(server.process)


@pytest.fixture(scope="module")
def client(api_server):
    """The real `openai` client on the session's server (tests skip without the test extra)."""
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")
    return openai.OpenAI(base_url=api_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
