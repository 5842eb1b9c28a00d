"""Truncated or corrupted GGUF files fail with one clear error, never a crash or a hang.

The cases run in a child process under a time limit, so that a hang fails the test instead of stalling
the suite. Among them are the corruptions that make gguf-py itself loop for hours (a huge length on a
numeric array) or fail deep inside numpy (a truncated tensor)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_path

_CHILD = r"""
import json, random, struct, sys
from pathlib import Path
from torchchat.checkpoint import LoadOptions
from torchchat.checkpoint.gguf import load_gguf
from torchchat.errors import TorchchatError

src = Path(sys.argv[1]).read_bytes()
work = Path(sys.argv[2])
with_tokenizer = sys.argv[3] == "1"

def patched(offset, fmt, value):
    data = bytearray(src)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)

def after(key):
    return src.index(key.encode()) + len(key)

data_start = src.index(b"blk.4.ffn_norm.weight")  # the last tensor info; data follows (aligned)
named = {
    "tensor count huge": patched(8, "<Q", 1 << 40),
    "metadata count huge": patched(16, "<Q", 1 << 40),
    "scores array length huge": patched(after("tokenizer.ggml.scores") + 8, "<Q", 1 << 40),
    "tokens array length huge": patched(after("tokenizer.ggml.tokens") + 8, "<Q", 1 << 40),
    "key length huge": patched(24, "<Q", 1 << 62),
    "value type unknown": patched(after("general.architecture"), "<I", 77),
    "tensor type unknown": patched(after("token_embd.weight") + 4 + 16, "<I", 99),
    "tensor dims count 9": patched(after("token_embd.weight"), "<I", 9),
    "tensor offset past the end": patched(after("output.weight") + 4 + 16 + 4, "<Q", 1 << 40),
    "tensor rows huge": patched(after("output.weight") + 4 + 8, "<Q", 1 << 33),
    "version 7": patched(4, "<I", 7),
    "bad magic": b"GGUX" + src[4:],
}
for n in (0, 3, 4, 8, 20, 24, 100, 1000, 5000, data_start, len(src) // 2, len(src) - 1):
    named[f"truncated to {n} bytes"] = src[:n]
rng = random.Random(0)
flips = []
for _ in range(80):  # random bit flips anywhere in the metadata and tensor infos
    pos = rng.randrange(4, data_start + 64)
    data = bytearray(src)
    data[pos] ^= 1 << rng.randrange(8)
    flips.append(bytes(data))

def attempt(data):
    work.write_bytes(data)
    try:
        load_gguf(work, LoadOptions(tokenizer=with_tokenizer))
        return "loaded"
    except TorchchatError as e:
        assert "\n" not in str(e), str(e)
        return "error: " + str(e)

result = {"named": {name: attempt(data) for name, data in named.items()},
          "flips": [attempt(data)[:6] for data in flips]}
print(json.dumps(result))
"""


def _run(tmp_path, with_tokenizer: bool) -> dict:
    source = shared_path("models", "stories260K", "stories260K.gguf")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(source), str(tmp_path / "case.gguf"), "1" if with_tokenizer else "0"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("with_tokenizer", [False, True], ids=["weights", "weights-and-tokenizer"])
def test_truncated_and_corrupted_files_fail_clearly(tmp_path, with_tokenizer):
    result = _run(tmp_path, with_tokenizer)
    for name, outcome in result["named"].items():
        assert outcome.startswith("error: "), f"{name}: {outcome}"
        assert str(tmp_path / "case.gguf") in outcome or "GGUF" in outcome, f"{name}: {outcome}"
    size = shared_path("models", "stories260K", "stories260K.gguf").stat().st_size
    assert "truncated" in result["named"]["truncated to 1000 bytes"]
    assert "truncated" in result["named"][f"truncated to {size - 1} bytes"]
    assert "unknown GGML type 99" in result["named"]["tensor type unknown"]
    # A flipped bit may land in a value that is still valid (a float, a character): then the file loads.
    assert set(result["flips"]) <= {"loaded", "error:"}
    assert result["flips"].count("error:") > 5
