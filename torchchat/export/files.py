"""Writing artifacts so that a failed or interrupted export leaves nothing half-written."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Terminated(SystemExit):
    """SIGTERM arrived while an artifact was being written: unwinds like Ctrl-C, exit status 143."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


@contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """SIGTERM's default action ends the process at once, skipping `finally` blocks; for the duration
    of a write it raises instead, so the temporary folder is removed. Only the main thread can set
    signal handlers, and a handler someone else installed is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def written_in_place(path: Path) -> Iterator[Path]:
    """Yields a path of the same name inside a temporary folder beside `path` (writers such as the
    .pt2 packager derive names from it); moves it to `path` when the block succeeds, and removes the
    temporary folder whatever happens, SIGTERM included."""
    with _terminate_unwinds():
        workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tmp = workdir / path.name
            yield tmp
            os.replace(tmp, path)  # same file system: atomic
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
