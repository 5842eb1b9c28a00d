"""Download a known model: fetch into the staging folder, verify, check it loads, rename into place.

Nothing is converted: torchchat reads Hugging Face folders, Meta `original/` folders and the tinyllamas
files as they come, so the model directory holds exactly one copy of the weights."""
from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from torchchat.errors import CheckpointError, ConfigError, DownloadError, DownloadInterrupted
from torchchat.inventory import store
from torchchat.model.registry import ModelEntry


@dataclass(frozen=True)
class DownloadOptions:
    model_directory: Path
    hf_token: str | None = None  # None: huggingface_hub's own (HF_TOKEN, then the `hf auth login` token)


def url_file_name(url: str) -> str:
    return PurePosixPath(unquote(urlsplit(url).path)).name


def _check_complete(folder: Path, entry: ModelEntry, model_directory: Path) -> None:
    """The staged folder must hold what `build` looks for. URL checkpoints are parsed (memory-mapped,
    cheap; an HTML error page saved as a model fails here); hub folders, whose files the checksums
    already vouch for, have their config read and their weight files listed, not loaded."""
    from torchchat.checkpoint import consolidated, hf
    from torchchat.checkpoint.detect import load_checkpoint

    if not (folder / entry.tokenizer_file).is_file():
        raise DownloadError(f"{entry.name}: the download has no {entry.tokenizer_file}")
    try:
        if entry.checkpoint_file:
            load_checkpoint(folder / entry.checkpoint_file)
        elif hf.is_hf_dir(folder):
            hf.check_hf_dir(folder)
        elif consolidated.find_consolidated_dir(folder) is None:
            raise CheckpointError(f"{folder}: neither config.json nor original/params.json")
    except (CheckpointError, ConfigError) as e:
        store.discard_staging(entry, model_directory)
        raise DownloadError(f"{entry.name}: the downloaded files do not load ({e}); they were deleted") from e


def _fetch(entry: ModelEntry, staging: Path, options: DownloadOptions) -> None:
    if entry.hf_repo:
        from torchchat.inventory.hub import download_repo

        download_repo(entry.hf_repo, entry.tokenizer_file, staging, options.hf_token)
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping
    elif entry.urls:
        from torchchat.inventory.http import fetch_url

        for url in entry.urls:
            dest = staging / url_file_name(url)
            if not dest.is_file():
                fetch_url(url, dest)
    else:
        raise DownloadError(f"{entry.name} has no download source in models.json")


def _has_progress(staging: Path) -> bool:
    """Whether a failed download fetched any whole file worth keeping (huggingface_hub's lock, metadata
    and tree files under `.cache/` are not)."""
    return any(p.is_file() and ".cache" not in p.relative_to(staging).parts for p in staging.rglob("*"))


@contextmanager
def download_lock(entry: ModelEntry, model_directory: Path):
    """Holds `<model-directory>/.partial/<name>.lock` (an flock) for one download of `entry`; a second
    `download` of the same model, in another process, is refused with one line instead of writing
    into the same `.part` files. The lock file is removed on the way out; a process that locked a
    file someone else removed in between tries again on the current one."""
    import fcntl

    staging = store.staging_dir(entry, model_directory)
    lock_path = staging.with_name(staging.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DownloadError(
                f"another download of {entry.name} is running (pid {holder}); wait for it to finish, then run this "
                "again"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        store.prune_partial(lock_path.parent, model_directory)


def download_model(entry: ModelEntry, options: DownloadOptions) -> Path:
    """Make `entry` present in the model directory and return its folder. Already downloaded: returns
    at once. On failure the model directory is as it was, except that files fetched so far wait under
    `.partial/` for the next attempt to resume; the DownloadError says so (DownloadInterrupted, exit
    130, for Ctrl-C)."""
    final = entry.local_dir(options.model_directory)
    if final.is_dir():
        return final
    with download_lock(entry, options.model_directory):
        if final.is_dir():  # another process finished it while we started
            return final
        return _download_locked(entry, options, final)


def _download_locked(entry: ModelEntry, options: DownloadOptions, final: Path) -> Path:
    staging = store.staging_dir(entry, options.model_directory)
    staging.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {entry.name} to {final}", file=sys.stderr)
    try:
        _fetch(entry, staging, options)
        _check_complete(staging, entry, options.model_directory)
    except (DownloadError, KeyboardInterrupt) as e:
        kept = _has_progress(staging)
        if not kept:
            store.discard_staging(entry, options.model_directory)
        where = (
            f"files fetched so far are kept in {staging} and the next download resumes from them"
            if kept else "nothing was kept"
        )
        if isinstance(e, KeyboardInterrupt):
            raise DownloadInterrupted(f"download of {entry.name} interrupted; {final} was not created ({where})") from e
        raise DownloadError(f"download of {entry.name} failed: {e}; {final} was not created ({where})") from e
    return store.install(staging, entry, options.model_directory)
