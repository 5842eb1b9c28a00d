"""What the bench scripts share: where the checkout and the shared test data are, the command line of
the real CLI, a subprocess runner that stops the benchmark with the failed command's stderr, and a
median timer.

The scripts run as `python3 bench/NAME.py`, which puts bench/ first on sys.path, so they import this
module as `from common import ...` (no sys.path edits, no package). It imports no torch: a timer that
must wait for a device is given its synchronize function."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent  # the checkout
SHARED = Path(os.environ.get("TORCHCHAT_SHARED", ROOT.parent / "shared"))  # models and tokenizers, as the tests find them
CLI = [sys.executable, str(ROOT / "torchchat.py")]  # prefix of a torchchat command line


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` capturing its output; a non-zero exit ends the benchmark with the command and the tail
    of its stderr (a benchmark of a failed command measures nothing)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 0,
                   sync: Callable[[], None] | None = None) -> float:
    """Median wall time in seconds of `repeat` calls of `fn`, after `warmup` untimed calls. `sync`
    (e.g. torch.cuda.synchronize) is called before starting and before stopping the clock, so that
    asynchronous device work is inside the measured time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
