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

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, row: int = 0) -> tuple[Tensor, Tensor]:
        """k, v: (B, H_kv, S, D) for cache rows [row, row + B); input_pos: (S,) positions shared by
        those rows, or (B, S) each row's own (sequences of a batch at different lengths). Returns the
        whole caches of those rows (views, no copy)."""
        bsz = k.size(0)
        k, v = k.to(self.k_cache.dtype), v.to(self.v_cache.dtype)  # no-op unless the cache is narrower
        k_rows, v_rows = self.k_cache[row : row + bsz], self.v_cache[row : row + bsz]
        if input_pos.dim() == 1:
            k_rows.index_copy_(2, input_pos, k)
            v_rows.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(bsz, device=input_pos.device).view(bsz, 1)
            # Advanced indices around a slice put their dims first: the target is (B, S, H_kv, D).
            k_rows[rows, :, input_pos] = k.transpose(1, 2)
            v_rows[rows, :, input_pos] = v.transpose(1, 2)
        return k_rows, v_rows

    def update_rotated(self, input_pos: Tensor, k: Tensor, v: Tensor, rope: Tensor, rope_dim: int,
                       row: int = 0) -> tuple[Tensor, Tensor]:
        """`update` for k, v still in (B, S, H_kv, D), rotating the first `rope_dim` values of each key
        head by `rope` (S or B, S, rope_dim/2, 2) first (0: none), in one pass of the native CPU kernel
        torchchat_cpu::kv_update. Eager CPU only (Attention.native_ops). Returns what `update` returns."""
        bsz = k.size(0)
        torch.ops.torchchat_cpu.kv_update(k, v, rope, rope_dim, input_pos, self.k_cache, self.v_cache, row)
        return self.k_cache[row : row + bsz], self.v_cache[row : row + bsz]
