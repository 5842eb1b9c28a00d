"""`generate MODEL` downloads a named model that is missing, then runs it: llama2.c's golden text from
the direct-URL files and from the Hugging Face layout fetched with huggingface_hub."""
from __future__ import annotations

import pytest

from torchchat.cli import main

GREEDY = ["--prompt", "", "--temperature", "0", "--max-new-tokens", "200", "--dtype", "fp32", "--device", "cpu"]


@pytest.mark.parametrize("name", ["stories260K", "llama2-base"], ids=["direct-urls", "hub-safetensors"])
def test_generate_downloads_then_matches_llama2c(name, hub, tinyllamas, stories_repo, model_dir, stories260k_dir, capsys):
    assert main(["generate", name, "--model-directory", str(model_dir), *GREEDY]) == 0
    out, err = capsys.readouterr()
    assert "Downloading" in err
    assert out == (stories260k_dir / "expected_greedy_200.txt").read_text() + "\n"
    assert not (model_dir / ".partial").exists()

    fetched = len(hub.log)
    assert main(["generate", name, "--model-directory", str(model_dir), *GREEDY]) == 0
    assert len(hub.log) == fetched  # present now: nothing fetched again
    assert "Downloading" not in capsys.readouterr().err


def test_generate_with_failed_download_leaves_nothing(hub, model_dir, capsys):
    assert main(["generate", "stories260K", "--model-directory", str(model_dir), *GREEDY]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "was not created" in lines[0]
    assert list(model_dir.iterdir()) == []
