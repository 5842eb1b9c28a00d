"""Hugging Face model directories: config.json plus safetensors (single or sharded) or .bin shards.

HF stores q/k projections permuted for its half-split RoPE; they are permuted back to the adjacent-pair
layout our RoPE uses (the inverse of the permutation in transformers' Llama conversion script)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from torchchat.errors import CheckpointError, ConfigError
from torchchat.model.config import ModelConfig, RopeScaling
from torchchat.model.params_check import validate_params

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: must hold a JSON object")
    arch = hf.get("model_type", "llama")
    if arch not in ("llama", "mistral", "granite"):
        raise ConfigError(f"{source}: model_type '{arch}' is not supported (llama, mistral, granite)")
    try:
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        if rope.get("rope_type", rope.get("type")) == "llama3":
            scaling = RopeScaling(
                factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                high_freq_factor=rope["high_freq_factor"],
                original_max_position_embeddings=rope["original_max_position_embeddings"],
            )
        elif rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ConfigError(f"{source}: rope scaling type {rope.get('rope_type')!r} is not supported (llama3 is)")
        fields = dict(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            vocab_size=hf["vocab_size"],
            hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_base=float(theta),
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
            attention_multiplier=hf.get("attention_multiplier"),
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
        )
        validate_params(fields, source)
        return ModelConfig(**fields)
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e}") from e
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # a value of the wrong JSON type
        raise ConfigError(f"{source}: malformed value ({e})") from e


def unpermute(w: Tensor, n_heads: int) -> Tensor:
    """HF half-split rows -> adjacent pairs. w: (n_heads * head_dim, ...) weight or bias."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed shard index ({e})") from e
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard(s) {', '.join(missing)} named in {index_name} are missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")


def _read(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(file)  # memory-mapped by safetensors
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from e
    from torchchat.checkpoint.pickled import load_state_dict

    return load_state_dict(file, "Hugging Face pytorch_model.bin")


def _read_config(path: Path) -> ModelConfig:
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    return config_from_hf(hf, source=str(path / "config.json"))


def check_hf_dir(path: Path) -> ModelConfig:
    """Read config.json and check that the weight files it needs are there, without loading them."""
    config = _read_config(path)
    _weight_files(path)
    return config


def load_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    config = _read_config(path)
    state: dict[str, Tensor] = {}
    unknown: list[str] = []
    for file in _weight_files(path):
        for key, value in _read(file).items():
            name = _TOP_MAP.get(key)
            if name is None:
                m = _LAYER_RE.match(key)
                if m and m.group(2) in _LAYER_MAP:
                    name = f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
            if name is None:
                if not key.endswith("rotary_emb.inv_freq"):
                    unknown.append(key)
                continue
            if name.endswith(("attention.wq.weight", "attention.wq.bias")):
                value = unpermute(value, config.n_heads)
            elif name.endswith(("attention.wk.weight", "attention.wk.bias")):
                value = unpermute(value, config.n_kv_heads)
            state[name] = value
    if unknown:
        raise CheckpointError(f"{path}: unknown weight name(s) {', '.join(unknown[:6])} ({len(unknown)} in all)")
    if config.tie_embeddings:
        state.pop("output.weight", None)
    return config, state
