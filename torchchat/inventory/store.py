"""The model directory: where each known model lives, what is downloaded, installing and removing.

`<model-directory>/<name>/` is a complete model; `<model-directory>/.partial/<name>/` is a download in
progress (kept after an interruption so the next `download` resumes); `.trash/` briefly holds a model
being removed, so that an interrupted removal never leaves half a model in place."""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from torchchat.model.registry import ModelEntry, known_models

PARTIAL = ".partial"
TRASH = ".trash"


def default_model_directory() -> Path:
    """$TORCHCHAT_MODELDIR, else ~/.torchchat/model-cache."""
    return Path(os.environ.get("TORCHCHAT_MODELDIR", Path.home() / ".torchchat" / "model-cache")).expanduser()


@dataclass(frozen=True)
class ModelStatus:
    entry: ModelEntry
    path: Path  # where the model lives (or would live) in the model directory
    downloaded: bool
    partial: bool  # an interrupted download waits to be resumed


def staging_dir(entry: ModelEntry, model_directory: Path) -> Path:
    return Path(model_directory) / PARTIAL / entry.name


def status(entry: ModelEntry, model_directory: Path) -> ModelStatus:
    path = entry.local_dir(model_directory)
    return ModelStatus(entry, path, path.is_dir(), staging_dir(entry, model_directory).is_dir())


def list_models(model_directory: Path) -> list[ModelStatus]:
    """Every known model, in registry order, with its download state."""
    return [status(entry, model_directory) for entry in known_models()]


def _prune_empty_parents(path: Path, stop: Path) -> None:
    """Remove empty folders from `path` up to (not including) `stop`: the `meta-llama/` level of a
    removed `meta-llama/Llama-3.2-1B` and the `.partial` folder itself."""
    path, stop = path.resolve(), stop.resolve()
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def install(staging: Path, entry: ModelEntry, model_directory: Path) -> Path:
    """Move a complete, verified staging folder into place with one rename."""
    final = entry.local_dir(model_directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    _prune_empty_parents(staging.parent, Path(model_directory))
    return final


def prune_partial(path: Path, model_directory: Path) -> None:
    """Remove `path` and its parents up to the model directory where they are empty (after a lock
    file or staging folder under `.partial/` goes)."""
    _prune_empty_parents(path, Path(model_directory))


def discard_staging(entry: ModelEntry, model_directory: Path) -> None:
    staging = staging_dir(entry, model_directory)
    shutil.rmtree(staging, ignore_errors=True)
    _prune_empty_parents(staging.parent, Path(model_directory))


def remove(entry: ModelEntry, model_directory: Path) -> list[Path]:
    """Delete a downloaded model and any partial download of it; returns what was removed."""
    model_directory = Path(model_directory)
    removed = []
    final = entry.local_dir(model_directory)
    if final.is_dir():
        trash = model_directory / TRASH / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, trash)  # from here on the model is gone, whatever happens to the deletion
        shutil.rmtree(trash)
        _prune_empty_parents(trash.parent, model_directory)
        _prune_empty_parents(final.parent, model_directory)
        removed.append(final)
    staging = staging_dir(entry, model_directory)
    if staging.is_dir():
        discard_staging(entry, model_directory)
        removed.append(staging)
    return removed
