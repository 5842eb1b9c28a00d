"""Model architecture as a frozen dataclass, built from any params dialect we meet.

Params dialects accepted by `ModelConfig.from_params`: Meta `params.json` (dim, n_layers, n_heads,
n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, use_scaled_rope), the original
torchchat / gpt-fast tables (block_size, rope_base, n_local_heads, intermediate_size, hidden_dim) and our
own field names. Unknown keys are an error: a typo must not silently change the architecture.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from torchchat.errors import ConfigError
from torchchat.model.params_check import validate_params


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` "llama3" (Llama 3.1/3.2: factor, low/high_freq_factor,
    original_max_position_embeddings), "linear" (every frequency divided by `factor`, Gemma 3 global
    layers) or "longrope" (Phi-3/Phi-4-mini, "su" in older configs: frequencies divided per dimension by
    `short_factor`, or by `long_factor` when the context exceeds original_max_position_embeddings, and
    cos/sin multiplied by `attention_factor`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear", "longrope"):
            raise ConfigError(f"rope scaling type {self.rope_type!r} is not supported (llama3, linear, longrope are)")
        object.__setattr__(self, "short_factor", tuple(float(f) for f in self.short_factor))
        object.__setattr__(self, "long_factor", tuple(float(f) for f in self.long_factor))


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Granite-style multipliers; the defaults are plain Llama.
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None  # None: 1/sqrt(head_dim)
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Switches for Llama's relatives (Qwen2/3, Gemma 2/3, Phi-3/4-mini, SmolLM3); the defaults are plain Llama.
    # Gemma's RMSNorm (1 + w) needs none: its loaders store 1 + w, as llama.cpp's converter does.
    qkv_bias: bool = False  # bias on q/k/v but not on wo (Qwen2); attention_bias puts one on all four
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    rope_dim: int | None = None  # dims of each head that RoPE rotates (Phi-4-mini: 3/4); None: head_dim
    activation: str = "silu"  # gate activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)
    sandwich_norms: bool = False  # also a norm after attention and after the MLP (Gemma 2/3)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits (Gemma 2)
    sliding_window: int | None = None  # layers in sliding_layers see the last `sliding_window` positions
    sliding_layers: tuple[int, ...] = ()
    rope_local_base: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3); None: rope_base
    nope_layers: tuple[int, ...] = ()  # layers that apply no RoPE (SmolLM3)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "sliding_layers", tuple(int(i) for i in self.sliding_layers))
        object.__setattr__(self, "nope_layers", tuple(int(i) for i in self.nope_layers))
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"model params: activation {self.activation!r} is not supported (silu, gelu_tanh)")
        if self.rope_dim is not None and (self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim):
            raise ConfigError(f"model params: rope_dim {self.rope_dim} must be even and at most head_dim {self.head_dim}")
        if self.sliding_layers and not self.sliding_window:
            raise ConfigError("model params: sliding_layers are given but no sliding_window")
        for name in ("sliding_layers", "nope_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.n_layers]
            if bad:
                raise ConfigError(f"model params: {name} {bad} are not layers of a {self.n_layers}-layer model")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model params: {name} must be a positive integer, got {value!r}")

    @property
    def attention_scale(self) -> float:
        return self.attention_multiplier if self.attention_multiplier is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates."""
        return self.rope_dim if self.rope_dim is not None else self.head_dim

    def with_max_seq_len(self, max_seq_len: int) -> "ModelConfig":
        return replace(self, max_seq_len=max_seq_len)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict` (used by exported artifacts' metadata)."""
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_params(cls, params: Mapping[str, Any], source: str = "params") -> "ModelConfig":
        """Build from a params table in any dialect (see module docstring)."""
        p = dict(params)
        aliases = {
            "n_local_heads": "n_kv_heads",
            "num_key_value_heads": "n_kv_heads",
            "rope_theta": "rope_base",
            "block_size": "max_seq_len",
            "intermediate_size": "hidden_dim",
            "tie_word_embeddings": "tie_embeddings",
            "max_position_embeddings": "max_seq_len",
        }
        for old, new in aliases.items():
            if old in p:
                value = p.pop(old)
                p.setdefault(new, value)
        validate_params(p, source)  # types and ranges first: the arithmetic below trusts them
        multiple_of = p.pop("multiple_of", 256)
        ffn_dim_multiplier = p.pop("ffn_dim_multiplier", None)
        use_scaled_rope = p.pop("use_scaled_rope", None)
        # Keys that some tables carry but that say nothing about the architecture.
        for ignored in ("use_tiktoken", "tokenizer", "use_hf_tokenizer", "model_type", "norm_type"):
            p.pop(ignored, None)
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(p) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(known))}"
                " plus multiple_of, ffn_dim_multiplier, use_scaled_rope"
            )
        for required in ("dim", "n_layers", "n_heads", "vocab_size"):
            if required not in p:
                raise ConfigError(f"{source}: missing required key '{required}'")
        if p.get("hidden_dim") is None:
            p["hidden_dim"] = ffn_hidden_dim(p["dim"], multiple_of, ffn_dim_multiplier)
        scaling = p.get("rope_scaling")
        if isinstance(scaling, Mapping):
            allowed = {f.name for f in fields(RopeScaling)}
            p["rope_scaling"] = RopeScaling(**{k: v for k, v in scaling.items() if k in allowed})
        elif use_scaled_rope and scaling is None:
            p["rope_scaling"] = RopeScaling()
        try:
            return cls(**p)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"params file not found: {path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"params file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"params file {path} must hold a JSON object")
        return cls.from_params(data, source=str(path))


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU width rule: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
