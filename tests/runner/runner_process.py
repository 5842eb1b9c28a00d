"""Running the C++ runner binaries, and `torchchat.py export` for them, from tests."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / "cmake-out"
MAX_SEQ_LEN = 512  # the tests export stories260K with its whole context


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str


def run_binary(binary: Path, *args: str | Path, stdin: str | None = None, timeout: float = 120) -> RunResult:
    """Runs `binary` on one thread in an environment without Python variables (runners need none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(binary), *map(str, args)], input=None if stdin is None else stdin.encode(),
                          capture_output=True, env=env, timeout=timeout)
    return RunResult(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


def export(*args: str | Path) -> None:
    """`torchchat.py export` as a user runs it, on one thread (exporting is compile-bound; the other core
    stays with the rest of the suite)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "torchchat.py"), "export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        pytest.fail(f"torchchat.py export failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
