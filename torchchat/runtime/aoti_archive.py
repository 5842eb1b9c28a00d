"""What a `.pt2` must (and must not) hold before torch's package loader sees it.

An AOT Inductor package runs the compiled library inside it: that is code by design, and trusting the
file means trusting its author (docs/security.md). What must not happen is more than that: a `.pt2`
is also the container of torch.export programs, and torch's Python reader
(`torch._inductor.aoti_load_package` -> `load_pt2`) unpickles their weights, constants and sample
inputs with `torch.load(weights_only=False)` or `pickle.loads`, which runs whatever a crafted pickle
says before any check of ours. So:

- every member is read once, whole, and its CRC checked (zipfile raises on a mismatch), so a damaged
  archive is refused here instead of crashing the native loader;
- only the members torchchat's own exports contain are allowed: the archive markers and
  `data/aotinductor/<model>/...` (the library, its sources, metadata JSON and weight blobs);
  `models/`, `data/weights/`, `data/constants/`, `data/sample_inputs/`, `extra/` and anything else
  are refused, as is any member, wherever it sits, that starts like a pickle or a torch.save archive;
- member names may not climb out of the folder they are extracted to;
- the package is then opened with the C++ `AOTIModelPackageLoader` directly, which loads the library
  and raw weight blobs and never unpickles, instead of `aoti_load_package`.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from torchchat.errors import ExportError

MODEL_NAME = "model"  # the name aoti_compile_and_package gives the one model of a package
_CHUNK = 1 << 20
# Archive bookkeeping that torch writes beside the model (all small text).
_MARKERS = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_AOTI_PREFIX = "data/aotinductor/"
_REFUSED_EXTENSIONS = (".pkl", ".pickle", ".pt", ".pth", ".ckpt")
_TMP_RE = re.compile(r"(aotinductor_[A-Za-z0-9]{6})")


def _looks_pickled(head: bytes) -> bool:
    """A pickle (protocol 2-5 starts with PROTO n) or a torch.save zip (a nested zip archive)."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def check_package(path: Path, flag: str) -> str:
    """Raise ExportError unless `path` is an intact AOT Inductor package holding only a compiled model
    (see module docstring). Reads the whole archive once (its CRCs). Returns the archive's root folder."""
    hint = "export it again with `torchchat.py export MODEL --output-aoti-package-path X.pt2`"
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            roots = {PurePosixPath(i.filename).parts[0] for i in infos if i.filename.strip("/")}
            if len(roots) != 1:
                raise ExportError(f"{flag}: {path} is not an AOT Inductor package (members under "
                                  f"{len(roots)} top-level folders, one expected); {hint}")
            models = set()
            for info in infos:
                name = info.filename
                parts = PurePosixPath(name).parts
                if not name or name.startswith("/") or "\\" in name or ".." in parts:
                    raise ExportError(f"{flag}: {path}: member {name!r} would be written outside the package "
                                      f"folder; refusing it")
                rel = "/".join(parts[1:])
                if info.is_dir():
                    continue
                if rel not in _MARKERS and not rel.startswith(_AOTI_PREFIX):
                    raise ExportError(
                        f"{flag}: {path} holds {rel!r}, which is not part of an AOT Inductor package (torch "
                        f"would unpickle it, which can run code); refusing to load it. {hint}"
                    )
                if rel.startswith(_AOTI_PREFIX):
                    models.add(rel[len(_AOTI_PREFIX):].split("/")[0])
                if rel.lower().endswith(_REFUSED_EXTENSIONS):
                    raise ExportError(f"{flag}: {path} holds the pickle file {rel!r}; refusing to load it. {hint}")
                with zf.open(info) as member:  # zipfile checks the CRC when the member is read to its end
                    head = member.read(_CHUNK)
                    if _looks_pickled(head[:4]):
                        raise ExportError(f"{flag}: {path}: member {rel!r} is a pickle; refusing to load it. {hint}")
                    while member.read(_CHUNK):
                        pass
    except zipfile.BadZipFile as e:
        raise ExportError(f"{flag}: {path} is damaged or truncated ({e}); {hint}") from e
    except (OSError, EOFError, NotImplementedError, RuntimeError, ValueError, IndexError, OverflowError,
            zlib.error) as e:
        # zlib errors, unsupported compression, encrypted members, a file truncated while read
        raise ExportError(f"{flag}: {path} is damaged or unreadable ({e}); {hint}") from e
    if MODEL_NAME not in models:
        raise ExportError(f"{flag}: {path} holds no compiled model (no {_AOTI_PREFIX}{MODEL_NAME}/); {hint}")
    return roots.pop()


def load_package(path: Path, flag: str):
    """Check `path` (check_package), then load it with the native loader; returns an object with
    `get_metadata()` and `__call__(tokens, input_pos)` like aoti_load_package's. A failed load leaves
    no `aotinductor_*` extraction folder behind."""
    import torch
    from torch._inductor.package.package import AOTICompiledModel

    root = check_package(path, flag)
    before = _extraction_dirs()
    try:
        # Single-threaded: torchchat calls a model from one thread at a time, and the container's
        # multi-threaded mode tracks each run with a CUDA event that it queries before the next call,
        # which fails once a call has been captured into a CUDA graph (runtime/aoti.py captures the
        # decode step).
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), MODEL_NAME, True, 1, -1)
    except Exception as e:  # RuntimeError from dlopen, miniz, the model container; c10::Error subclasses
        _remove_extraction_dirs(str(e), before, root)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{flag}: {path} could not be loaded as an AOT Inductor package ({first}); "
                          "export it again") from e
    return AOTICompiledModel(loader)


def _extraction_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("aotinductor_*"))


def _remove_extraction_dirs(message: str, before: set[Path], root: str) -> None:
    """The native loader extracts the archive to $TMPDIR/aotinductor_XXXXXX and leaves it there when
    loading fails. Its error names the folder when it got that far; otherwise the folders that
    appeared during the call and hold this archive's `<root>/data/aotinductor` tree."""
    tmp = Path(tempfile.gettempdir())
    named = {tmp / m for m in _TMP_RE.findall(message)}
    new = {d for d in _extraction_dirs() - before if (d / root / "data" / "aotinductor").is_dir()}
    for folder in named | new:
        shutil.rmtree(folder, ignore_errors=True)
