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


def test_max_concurrent_below_one(capsys):
    assert main(["server", *stories_args(), "--port", "0", "--max-concurrent", "0"]) != 0
    assert "--max-concurrent 0" in one_error_line(capsys)


def test_default_slots_fit_the_kv_budget():
    import torch

    from torchchat.cli.server import default_slots
    from torchchat.model.config import ModelConfig

    llama8b = ModelConfig.from_params(dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256))
    tiny = ModelConfig.from_params(dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000))
    assert default_slots(tiny, 256, torch.float32, "cpu")[0] == 8
    assert default_slots(tiny, 256, torch.float32, "cuda")[0] == 16
    slots, per_slot = default_slots(llama8b, 8192, torch.bfloat16, "cpu")
    assert per_slot == 1 << 30 and slots == 4  # a 4 GiB KV budget on CPU
    assert default_slots(llama8b, 8192, torch.bfloat16, "cuda")[0] == 16
