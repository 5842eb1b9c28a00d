"""Static KV cache: fixed-size buffers written in place at `input_pos`, so the decode step has no
data-dependent shapes and runs the same eager, compiled and exported."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    def __init__(self, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)  # (B, H_kv, S_max, D)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)  # (B, H_kv, S_max, D)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """input_pos: (S,); k, v: (B, H_kv, S, D). Returns the whole caches for batch rows [0, B)."""
        bsz = k.size(0)
        self.k_cache[:bsz].index_copy_(2, input_pos, k)
        self.v_cache[:bsz].index_copy_(2, input_pos, v)
        return self.k_cache[:bsz], self.v_cache[:bsz]
