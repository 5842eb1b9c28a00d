"""Timing the long export steps, with a sign of life while they run (AOT Inductor and ExecuTorch
lowering take tens of seconds to minutes and print nothing of their own)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


class StepTimer:
    """Records how long each named step took (seconds, in `times`). With `out`, announces each step,
    prints the elapsed time every `every` seconds while it runs, and its duration when it ends."""

    def __init__(self, out: TextIO | None = None, every: float = 15.0):
        self.out = out
        self.every = every
        self.times: dict[str, float] = {}

    def _say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._say(f"{name} ...")
        start = time.perf_counter()
        done = threading.Event()

        def tick() -> None:
            while not done.wait(self.every):
                self._say(f"  ... {name}: {time.perf_counter() - start:.0f} s so far")

        ticker = threading.Thread(target=tick, daemon=True) if self.out is not None else None
        if ticker is not None:
            ticker.start()
        try:
            yield
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
        self.times[name] = time.perf_counter() - start
        self._say(f"{name}: done in {self.times[name]:.1f} s")
