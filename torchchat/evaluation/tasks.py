"""Finding and loading lm-eval tasks: local task folders first, lm-eval's registry after.

Local folders (the `storybook` tasks shipped in `torchchat/evaluation/tasks/`, and any `--tasks-dir`)
hold task YAMLs with their data beside them, so they run offline. Indexing lm-eval's whole registry
parses ~14,000 YAML files (tens of seconds), so it is done only for a name no local folder or
registry folder of the same name defines.
"""
from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

from torchchat.errors import DownloadError, MissingDependencyError, UserInputError

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
LM_EVAL_PIN = "lm-eval==0.4.13"


def require_lm_eval() -> None:
    """Raise MissingDependencyError naming the install step when lm-eval is absent."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"eval needs lm-eval; install it with: pip install -e '.[eval]' (or pip install {LM_EVAL_PIN})"
        ) from e


@dataclass
class LoadedTasks:
    """Tasks ready for lm_eval.simple_evaluate: the TaskManager that found them and the loaded
    Task/Group objects (their data already read), one entry per name asked for (a tag gives several)."""

    manager: Any  # lm_eval.tasks.TaskManager
    objects: list[Any]


def _registry_root() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def _manager(include: Sequence[Path], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(p) for p in include], include_defaults=defaults)


def hub_host() -> str:
    """The host datasets are fetched from: HF_ENDPOINT's, else huggingface.co."""
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the dataset hub opens within `timeout_s` seconds."""
    try:
        with socket.create_connection((hub_host(), 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _behind_proxy() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _unknown(name: str, local: list[str], registry: list[str]) -> UserInputError:
    close = difflib.get_close_matches(name, local + registry, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserInputError(
        f"unknown task '{name}'; {hint}local tasks: {', '.join(local) or '(none)'}; lm-eval's registry has "
        f"{len(registry)} more (list them with: lm-eval ls tasks)"
    )


def _load_one(manager, name: str) -> list[Any]:
    """The Task/Group objects `name` stands for, its data read; data problems become typed errors."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        loaded = manager.load([name])
    except (ConnectionError, DatasetNotFoundError) as e:
        where = "a local task: storybook, or your own with --tasks-dir"
        if _offline():
            raise DownloadError(
                f"task '{name}' needs its dataset from the Hugging Face Hub, which is switched off "
                f"(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and the dataset is not cached; go online once, or run {where}"
            ) from e
        raise DownloadError(
            f"task '{name}': its dataset could not be fetched ({e}); check the network, or run {where}"
        ) from e
    except FileNotFoundError as e:
        raise UserInputError(
            f"task '{name}': data file not found ({e}); lm-eval reads data_files paths relative to the "
            "working directory, not to the YAML file: give an absolute path or run from that directory"
        ) from e
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())  # a tag: all the tasks it names


def load_tasks(
    names: Sequence[str], task_dirs: Sequence[Path] = (), notify: Callable[[str], None] = lambda _: None
) -> LoadedTasks:
    """Find `names` (tasks, groups or tags) in the shipped folder and `task_dirs` (which override it),
    then in lm-eval's registry, and load them. Unknown names raise UserInputError listing the local
    tasks and close matches; a registry task whose dataset cannot be reached raises DownloadError at
    once (no retry loop). `notify` receives one-line progress notes (the slow registry index)."""
    require_lm_eval()
    if not names:
        raise UserInputError("give at least one task with --tasks")
    for d in task_dirs:
        if not Path(d).is_dir():
            raise UserInputError(f"--tasks-dir {d}: not a folder")
    local_dirs = [SHIPPED_TASKS, *(Path(d).resolve() for d in task_dirs)]
    manager = _manager(local_dirs, defaults=False)
    local_names = list(manager.all_tasks)
    remote = [n for n in names if n not in local_names]
    registry_names: list[str] = []
    if remote:
        root = _registry_root()
        folders = [root / n for n in remote if (root / n).is_dir()]
        if folders:
            manager = _manager([*folders, *local_dirs], defaults=False)
        if any(n not in manager.all_tasks for n in remote):
            notify("Indexing lm-eval's task registry (about 14,000 task files; this takes a while)...")
            manager = _manager(local_dirs, defaults=True)
            registry_names = [n for n in manager.all_tasks if n not in local_names]
        for n in remote:
            if n not in manager.all_tasks:
                raise _unknown(n, local_names, registry_names)
        if not _offline() and not _behind_proxy() and not hub_reachable():
            raise DownloadError(
                f"task(s) {', '.join(remote)} download their data from {hub_host()}, which cannot be reached; "
                "check the network, set HF_DATASETS_OFFLINE=1 to use datasets already in the Hugging Face "
                "cache, or run a local task: storybook, or your own with --tasks-dir"
            )
    objects = [obj for n in names for obj in _load_one(manager, n)]
    return LoadedTasks(manager=manager, objects=objects)
