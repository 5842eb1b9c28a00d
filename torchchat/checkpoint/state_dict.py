"""Normalising state dicts to the Transformer's names, and checking they fit a config."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from torchchat.errors import CheckpointError
from torchchat.model.config import ModelConfig

# Keys some checkpoints carry that are derived buffers, not weights.
_DERIVED = ("freqs_cis", "rope.freqs", "rotary_emb.inv_freq")


def normalize(state_dict: Mapping[str, Tensor], config: ModelConfig | None = None) -> dict[str, Tensor]:
    """Strip wrapper prefixes (`_orig_mod.` from torch.compile, `module.` from (Distributed)DataParallel),
    drop derived buffers, and split gpt-fast's fused `wqkv` into wq/wk/wv (needs `config`)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.endswith(_DERIVED) or key in _DERIVED:
            continue
        if key.endswith("attention.wqkv.weight"):
            if config is None:
                raise CheckpointError(f"{key}: a fused wqkv checkpoint needs --params-table or --params-path")
            q = config.n_heads * config.head_dim
            kv = config.n_kv_heads * config.head_dim
            base = key[: -len("wqkv.weight")]
            wq, wk, wv = value.split([q, kv, kv], dim=0)
            out[base + "wq.weight"], out[base + "wk.weight"], out[base + "wv.weight"] = wq, wk, wv
            continue
        out[key] = value
    return out


def check_fits(state_dict: Mapping[str, Tensor], expected: Mapping[str, torch.Size], source: str) -> None:
    """Raise CheckpointError naming the first tensor whose shape differs, and missing/unexpected names."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    for key, shape in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {tuple(state_dict[key].shape)} in the checkpoint but the "
                f"model expects {tuple(shape)}; the params (--params-table/--params-path) do not fit this checkpoint"
            )
    if unexpected:
        shown = ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else "")
        raise CheckpointError(f"{source}: unknown weight name(s) {shown} ({len(unexpected)} in all)")
    if missing == ["output.weight"]:
        raise CheckpointError(
            f"{source}: no output.weight; if the checkpoint shares the embedding table with the output layer, "
            "its params must say tie_embeddings: true"
        )
    if missing:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise CheckpointError(f"{source}: missing weight(s) {shown} ({len(missing)} in all)")
