"""Rotary position embeddings. Pairs are adjacent elements (Meta / llama2.c layout): checkpoints in
Hugging Face's half-split layout are permuted back at load time, so the model has one RoPE."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from torchchat.errors import ConfigError
from torchchat.model.config import RopeScaling


def scaled_frequencies(freqs: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend in between."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    out = torch.where(wavelen > low_wavelen, freqs / scaling.factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, out)


def rope_table(seq_len: int, head_dim: int, base: float, scaling: RopeScaling | None = None) -> Tensor:
    """cos/sin table, shape (seq_len, head_dim // 2, 2), float32. `head_dim` is the rotated width
    (config.rope_dim). LongRoPE picks its long factors when the table (the context) is longer than
    the original context, as llama.cpp does; transformers switches per call on the current length."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    magnitude = 1.0
    if scaling is not None and scaling.rope_type == "linear":
        freqs = freqs / scaling.factor
    elif scaling is not None and scaling.rope_type == "longrope":
        long = seq_len > scaling.original_max_position_embeddings
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float64)
        if factors.numel() != freqs.numel():
            raise ConfigError(f"longrope: {factors.numel()} factors for {freqs.numel()} frequencies")
        freqs = freqs / factors
        magnitude = scaling.attention_factor
    elif scaling is not None:
        freqs = scaled_frequencies(freqs, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return (torch.stack([angles.cos(), angles.sin()], dim=-1) * magnitude).float()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """x: (B, S, H, D); table: (S, D/2, 2) rows for x's positions, or (B, S, D/2, 2) when each row of
    the batch has its own positions. Returns x rotated, in x's dtype."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, D/2, 2)
    # (S, 1, D/2, 2) or (B, S, 1, D/2, 2), broadcast over heads. A view(-1, S, ...) here made torch.export
    # guard on S before it knew the positions' length equals the tokens' (Gemma 2 failed to export).
    t = table.unsqueeze(-3)
    out = torch.stack(
        [
            xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
            xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)
