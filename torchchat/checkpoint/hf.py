"""Hugging Face model directories: config.json plus safetensors (single or sharded) or .bin shards.

HF stores q/k projections permuted for its half-split RoPE; they are permuted back to the adjacent-pair
layout our RoPE uses (the inverse of the permutation in transformers' Llama conversion script)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
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


# model_type -> what sets the family apart from Llama (see docs/models.md). Gemma's norms scale by
# (1 + w): its loader adds the 1 once, so the model keeps one RMSNorm.
_FAMILIES = ("llama", "mistral", "granite", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "smollm3")
_GEMMA = ("gemma2", "gemma3_text")
_GEMMA_LAYER_MAP = dict(_LAYER_MAP, post_attention_layernorm="attention_post_norm",
                        pre_feedforward_layernorm="ffn_norm", post_feedforward_layernorm="ffn_post_norm")
_QK_NORM_MAP = {"self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm"}


def _rope_parameters(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(global, sliding-layer) RoPE parameters from either config.json dialect: transformers 5's
    `rope_parameters` (per layer type for Gemma 3) or the hub's `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        return dict(params["full_attention"]), params.get("sliding_attention")
    merged = dict(hf.get("rope_scaling") or {})
    merged.update(params)
    merged.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    local = None
    if "rope_local_base_freq" in hf:
        local = {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
    return merged, local


def _rope_scaling(rope: dict[str, Any], hf: dict[str, Any], rope_dim: int, source: str) -> RopeScaling | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind == "llama3":
        return RopeScaling(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(rope["factor"]))
    if kind in ("longrope", "su"):
        original = rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
        factor = rope.get("factor") or hf["max_position_embeddings"] / original
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:  # transformers' default (LongRoPE paper)
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = RopeScaling(rope_type="longrope", factor=float(factor), original_max_position_embeddings=original,
                              short_factor=rope["short_factor"], long_factor=rope["long_factor"],
                              attention_factor=float(attention_factor))
        if len(scaling.short_factor) != rope_dim // 2 or len(scaling.long_factor) != rope_dim // 2:
            raise ConfigError(f"{source}: longrope needs {rope_dim // 2} short and long factors")
        return scaling
    raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported (llama3, linear, longrope are)")


def _layer_switches(hf: dict[str, Any], arch: str, n_layers: int) -> dict[str, Any]:
    """sliding_window / sliding_layers / nope_layers of a family (config.json's `layer_types` when given)."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if arch in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
        window = None
    if types is None and window:
        if arch == "gemma2":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif arch == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        elif arch in ("qwen2", "qwen3"):
            first = hf.get("max_window_layers", n_layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        elif arch in ("phi3", "smollm3"):
            types = ["sliding_attention"] * n_layers
    sliding = [i for i, t in enumerate(types or ()) if t == "sliding_attention"] if window else []
    if window and window >= hf.get("max_position_embeddings", 2048):
        sliding = []  # a window wider than the context masks nothing (Phi-4-mini's 262144)
    out: dict[str, Any] = {"sliding_window": window if sliding else None, "sliding_layers": tuple(sliding)}
    if arch == "smollm3":
        use_rope = hf.get("no_rope_layers")
        if use_rope is None:
            interval = hf.get("no_rope_layer_interval", 4)
            use_rope = [int((i + 1) % interval != 0) for i in range(n_layers)]
        out["nope_layers"] = tuple(i for i, r in enumerate(use_rope) if not r)
    return out


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: must hold a JSON object")
    arch = hf.get("model_type", "llama")
    if arch == "gemma3" and "text_config" in hf:
        raise ConfigError(f"{source}: multimodal Gemma 3 (model_type gemma3) is not supported; the text-only "
                          "gemma3_text checkpoints (google/gemma-3-1b-it) are")
    if arch not in _FAMILIES:
        raise ConfigError(f"{source}: model_type '{arch}' is not supported ({', '.join(_FAMILIES)})")
    try:
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        rope, local_rope = _rope_parameters(hf)
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        rope_dim = int(head_dim * partial)
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if act not in ("silu", "gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{source}: activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
        gemma = arch in _GEMMA
        scalar = hf.get("query_pre_attn_scalar")
        fields = dict(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim"),
            vocab_size=hf["vocab_size"],
            hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_base=float(rope["rope_theta"]),
            rope_scaling=_rope_scaling(rope, hf, rope_dim, source),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            embedding_multiplier=math.sqrt(hf["hidden_size"]) if gemma else float(hf.get("embedding_multiplier", 1.0)),
            attention_multiplier=scalar**-0.5 if scalar else hf.get("attention_multiplier"),
            residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
            logits_scaling=float(hf.get("logits_scaling", 1.0)),
            qkv_bias=arch == "qwen2",
            qk_norm=arch in ("qwen3", "gemma3_text"),
            rope_dim=rope_dim if rope_dim != head_dim else None,
            activation="silu" if act == "silu" else "gelu_tanh",
            sandwich_norms=gemma,
            attn_softcap=hf.get("attn_logit_softcapping") if gemma else None,
            final_softcap=hf.get("final_logit_softcapping") if gemma else None,
            rope_local_base=float(local_rope["rope_theta"]) if local_rope and arch == "gemma3_text" else None,
            **_layer_switches(hf, arch, hf["num_hidden_layers"]),
        )
        validate_params(fields, source)
        return ModelConfig(**fields)
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e}") from e
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # a value of the wrong JSON type
        raise ConfigError(f"{source}: malformed value ({e})") from e


def unpermute(w: Tensor, n_heads: int, rope_dim: int | None = None) -> Tensor:
    """HF half-split rows -> adjacent pairs. w: (n_heads * head_dim, ...) weight or bias. With partial
    rotary (`rope_dim` < head_dim) only the first rope_dim rows of each head are rotated, so only they move."""
    rows = w.shape[0]
    rest = w.shape[1:]
    head_dim = rows // n_heads
    if rope_dim is None or rope_dim == head_dim:
        return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)
    heads = w.reshape(n_heads, head_dim, *rest)
    rotated = heads[:, :rope_dim].reshape(n_heads, 2, rope_dim // 2, *rest).transpose(1, 2).reshape(n_heads, rope_dim, *rest)
    return torch.cat([rotated, heads[:, rope_dim:]], dim=1).reshape(rows, *rest)


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


def _split_fused(name: str, value: Tensor, config: ModelConfig) -> dict[str, Tensor]:
    """Phi-3's fused projections -> ours: qkv_proj rows are q|k|v, gate_up_proj rows gate|up."""
    base = name.rsplit(".", 2)[0]
    if name.endswith("attention.wqkv.weight"):
        kv = config.n_kv_heads * config.head_dim
        q, k, v = value.split([config.n_heads * config.head_dim, kv, kv], dim=0)
        return {f"{base}.wq.weight": q, f"{base}.wk.weight": k, f"{base}.wv.weight": v}
    gate, up = value.chunk(2, dim=0)
    return {f"{base}.w1.weight": gate, f"{base}.w3.weight": up}


def hf_to_ours(key: str, value: Tensor, config: ModelConfig, arch: str) -> dict[str, Tensor] | None:
    """One HF tensor -> our name(s) and layout (the one remap boundary for HF folders); None if unknown."""
    name = _TOP_MAP.get(key)
    if name is None:
        m = _LAYER_RE.match(key)
        layer_map = _GEMMA_LAYER_MAP if arch in _GEMMA else _LAYER_MAP
        part = m.group(2) if m else None
        target = layer_map.get(part) or _QK_NORM_MAP.get(part) or _FUSED_MAP.get(part)
        if target is None:
            return None
        name = f"layers.{m.group(1)}.{target}.{m.group(3)}"
    if name.endswith(("wqkv.weight", "w13.weight")):
        out = _split_fused(name, value, config)
    else:
        out = {name: value}
    for n in list(out):
        if n.endswith(("attention.wq.weight", "attention.wq.bias")):
            out[n] = unpermute(out[n], config.n_heads, config.rotary_dim)
        elif n.endswith(("attention.wk.weight", "attention.wk.bias")):
            out[n] = unpermute(out[n], config.n_kv_heads, config.rotary_dim)
        elif n.endswith(("q_norm.weight", "k_norm.weight")):
            out[n] = unpermute(out[n], 1, config.rotary_dim)  # one head's dims, permuted as q and k are
        if arch in _GEMMA and n.endswith("norm.weight"):
            out[n] = out[n].float() + 1.0  # Gemma's RMSNorm multiplies by (1 + w), in float32
    return out


_FUSED_MAP = {"self_attn.qkv_proj": "attention.wqkv", "mlp.gate_up_proj": "feed_forward.w13"}


def load_hf_dir(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    config = _read_config(path)
    arch = json.loads((path / "config.json").read_text()).get("model_type", "llama")
    state: dict[str, Tensor] = {}
    unknown: list[str] = []
    for file in _weight_files(path):
        for key, value in _read(file).items():
            mapped = hf_to_ours(key, value, config, arch)
            if mapped is None:
                if not key.endswith("rotary_emb.inv_freq"):
                    unknown.append(key)
                continue
            state.update(mapped)
    if unknown:
        raise CheckpointError(f"{path}: unknown weight name(s) {', '.join(unknown[:6])} ({len(unknown)} in all)")
    if config.tie_embeddings:
        state.pop("output.weight", None)
    return config, state
