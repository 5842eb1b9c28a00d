"""Reading PyTorch pickles (`.pt/.pth`, Meta's consolidated shards, HF `pytorch_model*.bin`) safely.

`weights_only=True` keeps a pickle from running code; this also turns everything such a file can
raise (a refused global, a zip that is not a checkpoint, a pickle of the wrong shape) into one
CheckpointError, so a damaged or foreign file is one line, never a traceback."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchchat.errors import CheckpointError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_pickle(path: Path, what: str = "PyTorch checkpoint") -> Any:
    """The object in a torch.save file, memory-mapped, with only tensors and plain containers allowed."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError, zipfile.BadZipFile, NotImplementedError) as e:
        # weights_only refuses arbitrary classes with UnpicklingError; malformed zips and pickles raise
        # any of the others from inside torch's reader.
        raise CheckpointError(f"{path}: not a readable {what} ({_first_line(e)})") from e


def load_state_dict(path: Path, what: str = "PyTorch checkpoint") -> dict[str, Tensor]:
    """A torch.save'd dict of name -> tensor, or CheckpointError saying what was found instead."""
    obj = load_pickle(path, what)
    check_state_dict(obj, path, what)
    return obj


def check_state_dict(obj: Any, path: Path, what: str) -> None:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: a {what} must hold a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: a {what} must hold a dict of tensors; {str(bad[0])[:60]!r} is not one")
