"""Checks on an architecture before anything is built from it: params values (types and ranges), and
the memory a model of that shape needs against what this machine has.

Params come from files we did not write (params JSON, a checkpoint's `model_args`, GGUF metadata). A
string where a number belongs, a zero head count or `multiple_of`, or `n_layers: 2147483648` must be
one line naming the key, not a traceback deep in the model code or an allocation that never ends."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

from torchchat.errors import ConfigError, UserInputError

# key -> (smallest, largest) for positive integers. Upper bounds are far beyond any published Llama
# (405B: dim 16384, 126 layers, 128 heads, vocab 128256, 131072 positions) and stop absurd values
# before any size is computed from them.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "dim": (1, 1 << 17),
    "n_layers": (1, 4096),
    "n_heads": (1, 4096),
    "n_kv_heads": (1, 4096),
    "head_dim": (2, 1 << 14),
    "vocab_size": (1, 1 << 23),
    "hidden_dim": (1, 1 << 20),
    "max_seq_len": (1, 1 << 24),
    "multiple_of": (1, 1 << 16),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {  # exclusive lower bound, inclusive upper bound
    "norm_eps": (0.0, 1.0),
    "rope_base": (0.0, 1e12),
    "ffn_dim_multiplier": (0.0, 64.0),
    "embedding_multiplier": (0.0, 1e6),
    "attention_multiplier": (0.0, 1e6),
    "residual_multiplier": (0.0, 1e6),
    "logits_scaling": (0.0, 1e6),
}
# Keys whose null means "the default" (derived from the others); any other null is an error.
_OPTIONAL = {"n_kv_heads", "head_dim", "hidden_dim", "ffn_dim_multiplier", "attention_multiplier", "use_scaled_rope"}
_BOOLS = ("tie_embeddings", "attention_bias", "mlp_bias", "use_scaled_rope")
_ROPE_SCALING = {"factor": (0.0, 1e6), "low_freq_factor": (0.0, 1e6), "high_freq_factor": (0.0, 1e6),
                 "original_max_position_embeddings": (0.0, float(1 << 24))}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_params(p: Mapping[str, Any], source: str) -> None:
    """Raise ConfigError (one line, naming the key and the valid range) for a value of the wrong type
    or out of range. Keys it does not know are left to the caller's unknown-key check."""
    for key, (lo, hi) in _INT_RANGES.items():
        if key not in p:
            continue
        v = p[key]
        if v is None and key in _OPTIONAL:
            continue
        if not _is_int(v):
            raise ConfigError(f"{source}: {key} must be an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"{source}: {key} {v} is out of range (expected {lo}..{hi})")
    for key, (lo, hi) in _FLOAT_RANGES.items():
        if key not in p:
            continue
        v = p[key]
        if v is None and key in _OPTIONAL:
            continue
        if not _is_number(v):
            raise ConfigError(f"{source}: {key} must be a number, got {v!r}")
        if not (math.isfinite(v) and lo < v <= hi):
            raise ConfigError(f"{source}: {key} {v} is out of range (expected a finite number > {lo:g} and <= {hi:g})")
    for key in _BOOLS:
        if key not in p or (p[key] is None and key in _OPTIONAL):
            continue
        v = p[key]
        if not isinstance(v, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {v!r}")
    scaling = p.get("rope_scaling")
    if scaling is not None and not hasattr(scaling, "factor"):  # a RopeScaling passes as is
        if not isinstance(scaling, Mapping):
            raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
        for key, (lo, hi) in _ROPE_SCALING.items():
            v = scaling.get(key)
            if v is not None and not (_is_number(v) and math.isfinite(v) and lo < v <= hi):
                raise ConfigError(f"{source}: rope_scaling.{key} must be a finite number > {lo:g}, got {v!r}")
    heads, kv, dim = p.get("n_heads"), p.get("n_kv_heads"), p.get("dim")
    if heads and kv and heads % kv:
        raise ConfigError(f"{source}: n_heads {heads} is not a multiple of n_kv_heads {kv}")
    if heads and dim and p.get("head_dim") is None and (dim % heads or (dim // heads) % 2):
        raise ConfigError(f"{source}: dim {dim} must split into n_heads {heads} heads of an even size")
    if p.get("head_dim") is not None and p["head_dim"] % 2:
        raise ConfigError(f"{source}: head_dim {p['head_dim']} must be even (RoPE rotates pairs)")


def weight_count(config) -> int:
    """Parameters of a Llama-shaped model: embeddings, attention, SwiGLU, norms, output."""
    q = config.n_heads * config.head_dim
    kv = config.n_kv_heads * config.head_dim
    per_layer = config.dim * (q + 2 * kv) + q * config.dim + 3 * config.dim * config.hidden_dim + 2 * config.dim
    out = 0 if config.tie_embeddings else config.vocab_size * config.dim
    return config.vocab_size * config.dim + config.n_layers * per_layer + config.dim + out


def machine_bytes(device: str) -> int | None:
    """Memory a model could ever use on `device`: RAM plus swap on the CPU, the card's total on CUDA;
    None where it cannot be told."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        try:
            return torch.cuda.get_device_properties(torch.device(device)).total_memory
        except (RuntimeError, AssertionError, ValueError):
            return None
    if kind != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemTotal"] + info.get("SwapTotal", 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_fits(need: int, what: str, device: str, hint: str) -> None:
    """Refuse, before allocating, what can never fit: `need` bytes beyond the machine's whole memory
    (RAM + swap, or the GPU's total). Tighter limits are left to the allocator: free memory changes."""
    have = machine_bytes(device)
    if have is not None and need > have:
        raise UserInputError(f"{what} needs about {_gib(need)} and this machine has {_gib(have)} on {device}; {hint}")


def check_model_fits(config, dtype_bytes: float, device: str, source: str) -> None:
    """The weights of `config` at `dtype_bytes` per parameter (0.5 for a 4-bit recipe) must fit."""
    n = weight_count(config)
    check_fits(int(n * dtype_bytes), f"{source}: a model of {n / 1e9:.2f}B parameters", device,
               "use a smaller model, a lower-precision --dtype or --quantize, or check the params")


def check_caches_fit(config, max_batch: int, max_seq: int, dtype_bytes: int, device: str) -> None:
    """KV caches (2 x layers x batch x positions x kv heads x head_dim), the RoPE table and the causal
    mask (positions^2 bytes) for `max_seq` positions."""
    seq = min(max_seq, config.max_seq_len)
    kv = 2 * config.n_layers * max_batch * seq * config.n_kv_heads * config.head_dim * dtype_bytes
    need = kv + seq * config.head_dim * 4 + seq * seq
    check_fits(need, f"a KV cache of {seq} positions", device, "lower --max-seq-length")
