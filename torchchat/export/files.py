"""Writing artifacts so that a failed or interrupted export leaves nothing half-written."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def written_in_place(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary name beside `path` (ending in `suffix`: some writers insist on one) to write
    to; renames it to `path` when the block succeeds and removes it whatever happens."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)  # same folder: atomic
    finally:
        if tmp.exists():
            tmp.unlink()
