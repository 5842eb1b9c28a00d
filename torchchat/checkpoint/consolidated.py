"""Meta's own checkpoints: `params.json` beside `consolidated.NN.pth` (the `original/` folder of the
meta-llama repositories). Names are already ours and q/k are in the adjacent-pair RoPE layout.

More than one `consolidated.*.pth` means model-parallel slices, joined the way Meta's reference code
split them: column-parallel weights (wq, wk, wv, w1, w3, output) along dim 0, row-parallel ones
(wo, w2) along dim 1, the embedding along dim 1 (Llama 2's ParallelEmbedding) or dim 0 (Llama 3's
VocabParallelEmbedding: told apart by the shapes), norms replicated."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from torchchat.checkpoint.pickled import load_state_dict
from torchchat.errors import CheckpointError, ConfigError
from torchchat.model.config import ModelConfig, RopeScaling

_SHARD_RE = re.compile(r"consolidated\.\d+\.pth$")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
# params.json keys that say nothing about the text model's architecture (tokenizer / vision options).
_IGNORED_PARAMS = ("vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers", "quantization_args")


def is_consolidated_shard(path: Path) -> bool:
    return _SHARD_RE.match(path.name) is not None and (path.parent / "params.json").is_file()


def find_consolidated_dir(path: Path) -> Path | None:
    """`path` itself or its `original/` subfolder, if it holds params.json and consolidated shards."""
    for folder in (path, path / "original"):
        if (folder / "params.json").is_file() and any(_SHARD_RE.match(p.name) for p in folder.glob("consolidated.*.pth")):
            return folder
    return None


def _config(params: dict, vocab_rows: int, source: str) -> ModelConfig:
    params = {k: v for k, v in params.items() if k not in _IGNORED_PARAMS}
    factor = params.pop("rope_scaling_factor", None)
    high = params.pop("rope_high_freq_factor", None)
    if params.get("vocab_size", -1) <= 0:  # Llama 2's params.json says -1: the tokenizer decides
        params["vocab_size"] = vocab_rows
    if params.get("use_scaled_rope") and (factor is not None or high is not None):
        defaults = RopeScaling()
        params.pop("use_scaled_rope")
        params["rope_scaling"] = {
            "factor": factor or defaults.factor,
            "high_freq_factor": high or defaults.high_freq_factor,
        }
    return ModelConfig.from_params(params, source=source)


def _merge(key: str, parts: list[Tensor], dim: int) -> Tensor:
    if len(parts) == 1:
        return parts[0]
    if parts[0].ndim == 1:  # norms: every slice holds the whole vector
        return parts[0]
    if key == "tok_embeddings.weight":
        return torch.cat(parts, dim=1 if parts[0].shape[1] * len(parts) == dim else 0)
    return torch.cat(parts, dim=1 if key.endswith(_ROW_PARALLEL) else 0)


def load_consolidated_dir(folder: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and state dict from a folder with params.json and consolidated.NN.pth slices."""
    params_path = folder / "params.json"
    try:
        params = json.loads(params_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{params_path}: unreadable params.json ({e})") from e
    files = sorted(p for p in folder.glob("consolidated.*.pth") if _SHARD_RE.match(p.name))
    shards = []
    for file in files:
        shards.append(load_state_dict(file, "Meta checkpoint shard"))
    keys = list(shards[0])
    for file, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(keys):
            raise CheckpointError(f"{file}: its tensors differ from {files[0].name}'s; the slices are not one model")
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]}: no tok_embeddings.weight; not a Meta Llama checkpoint")
    if not isinstance(params, dict):
        raise ConfigError(f"{params_path}: params.json must hold a JSON object")
    dim = params.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ConfigError(f"{params_path}: 'dim' must be a positive integer, got {dim!r}")
    state = {key: _merge(key, [s[key] for s in shards], dim) for key in keys}
    config = _config(params, state["tok_embeddings.weight"].shape[0], str(params_path))
    return config, state
