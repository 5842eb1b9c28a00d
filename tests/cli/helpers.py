"""Run the CLI as a user does: a subprocess of `python3 torchchat.py ...`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 300, input: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("TORCHCHAT_VERBOSE", None)
    return subprocess.run([sys.executable, str(ROOT / "torchchat.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, input=input, cwd=ROOT)
