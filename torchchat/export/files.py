"""Writing artifacts so that a failed or interrupted export leaves nothing half-written."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def written_in_place(path: Path) -> Iterator[Path]:
    """Yields a path of the same name inside a temporary folder beside `path` (writers such as the
    .pt2 packager derive names from it); moves it to `path` when the block succeeds, and removes the
    temporary folder whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = workdir / path.name
        yield tmp
        os.replace(tmp, path)  # same file system: atomic
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
