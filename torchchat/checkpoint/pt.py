"""PyTorch `.pt/.pth` state dicts (Meta / gpt-fast / llama2.c training checkpoints), memory-mapped."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from torchchat.checkpoint.pickled import check_state_dict, load_pickle
from torchchat.errors import CheckpointError
from torchchat.model.config import ModelConfig


def load_pt(path: Path) -> tuple[ModelConfig | None, dict[str, Tensor]]:
    """Returns the state dict and, for llama2.c training checkpoints, the config in `model_args`."""
    obj = load_pickle(path)
    config = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        args = obj.get("model_args")
        if isinstance(args, dict):
            params = {k: v for k, v in args.items() if k not in ("dropout", "bias")}
            config = ModelConfig.from_params(params, source=f"{path} model_args")
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or one under 'model')")
    check_state_dict(obj, path, "PyTorch checkpoint")
    return config, obj
