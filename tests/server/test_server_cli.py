"""`server` and `browser` command-line errors: one line on stderr and a non-zero exit, before any model
is loaded."""
from __future__ import annotations

import socket
import sys

from tests.server.conftest import stories_args
from torchchat.cli import main


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), err
    return err[0]


def test_port_in_use(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["server", *stories_args(), "--port", str(port)]) == 2
    line = one_error_line(capsys)
    assert f"127.0.0.1:{port}" in line and "--port" in line


def test_port_out_of_range(capsys):
    assert main(["browser", *stories_args(), "--no-open", "--port", "70000"]) == 2
    assert "0..65535" in one_error_line(capsys)


def test_empty_api_key(capsys):
    assert main(["server", *stories_args(), "--api-key", " "]) == 2
    assert "--api-key" in one_error_line(capsys)


def test_missing_fastapi_names_the_install_step(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` fail
    assert main(["server", *stories_args(), "--port", "0"]) == 1
    assert "pip install -e '.[server]'" in one_error_line(capsys)


def test_startup_lines_are_the_ones_docs_server_md_shows(api_server):
    """The notes, each once, then the one ready line: exactly the block docs/server.md prints."""
    import re

    from tests.conftest import ROOT

    doc = (ROOT / "docs" / "server.md").read_text()
    shown = doc.split("one line that starts `Serving`:\n\n```\n", 1)[1].split("```", 1)[0].splitlines()
    lines = api_server.log.read_text().splitlines()
    ready = next(i for i, line in enumerate(lines) if line.startswith("Serving "))
    assert [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:5000", line) for line in lines[: ready + 1]] == shown
