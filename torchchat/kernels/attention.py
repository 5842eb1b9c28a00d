"""Decode attention for one new token, in Triton: RoPE on q and k, the KV-cache write and attention
over the cached positions in one kernel (plus a small combine kernel when the context is split).

One program per (query head, context split, batch row): each row of a decode batch has its own
position and its own cache row (row0 + b), so B sequences decode in one launch. The new token's key
and value are taken from registers rather than from the cache, so the program that writes them into
the cache races with no reader. Long contexts are split into chunks handled by separate programs (flash-decoding); their partial
softmax states are merged by `_combine_kernel`. The number of splits depends only on the cache size,
so a captured CUDA graph stays valid as the position advances.

Import only on CUDA machines (or with TRITON_INTERPRET=1 for the CPU tests): this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchchat.kernels.gemv import pdl_enabled


@triton.jit
def _rotate(base_ptr, d, pair, c, s, sign):
    """RoPE with adjacent pairs, as torchchat.model.rope.apply_rope rounds it (float32 math)."""
    v = tl.load(base_ptr + d).to(tl.float32)
    vp = tl.load(base_ptr + pair).to(tl.float32)
    return v * c + sign * (vp * s)


@triton.jit(do_not_specialize=["ROW0"])  # a prefill's one-token step may land in any cache row
def _attn_decode_kernel(qkv_ptr, rope_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr, part_ptr, stat_ptr,
                        S_MAX, CHUNK, scale, ROW0,
                        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                        BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see torchchat.kernels.gemv: everything below depends on the previous kernels
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)  # batch row: its qkv, position, RoPE row and outputs; cache row ROW0 + b
    kvh = h // (H // HKV)
    dt = kc_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + b).to(tl.int32)
    d = tl.arange(0, D)
    pair = d ^ 1
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    rope_row = rope_ptr + b * D  # (D/2, 2) cos/sin per row
    c = tl.load(rope_row + (d // 2) * 2)
    s = tl.load(rope_row + (d // 2) * 2 + 1)
    qkv_row = qkv_ptr + b * (H + 2 * HKV) * D
    q = _rotate(qkv_row + h * D, d, pair, c, s, sign).to(dt).to(tl.float32)
    k_new = _rotate(qkv_row + (H + kvh) * D, d, pair, c, s, sign).to(dt)
    v_new = tl.load(qkv_row + (H + HKV + kvh) * D + d)
    base = ((ROW0 + b).to(tl.int64) * HKV + kvh) * S_MAX * D  # this row's head kvh in the cache
    live = pos >= 0  # a negative position: an idle row of the batch, which writes and reads nothing
    cache_row = base + tl.maximum(pos, 0).to(tl.int64) * D
    if (h % (H // HKV) == 0) & (split == 0) & live:
        tl.store(kc_ptr + cache_row + d, k_new)
        tl.store(vc_ptr + cache_row + d, v_new.to(dt))

    # The new token belongs to the split whose chunk holds `pos`; earlier positions come from the cache.
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, pos)  # <= lo for an idle row: no iterations
    here = (pos >= lo) & (pos < lo + CHUNK)
    score_new = tl.sum(q * k_new.to(tl.float32), 0) * scale
    m_i = tl.where(here, score_new, float("-inf"))
    l_i = tl.where(here, 1.0, 0.0)
    acc = tl.where(here, v_new.to(tl.float32), 0.0)
    si = tl.arange(0, BLOCK_S)
    for s0 in range(lo, hi, BLOCK_S):
        spos = s0 + si
        smask = spos < hi
        offs = base + spos.to(tl.int64)[:, None] * D + d[None, :]
        kt = tl.load(kc_ptr + offs, mask=smask[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(kt * q[None, :], 1) * scale
        sc = tl.where(smask, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new)
        vt = tl.load(vc_ptr + offs, mask=smask[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, 0)
        m_i = m_new
    if SPLITS == 1:
        # l_i > 0 on a live row (its own token); an idle row's output is zeros.
        tl.store(out_ptr + (b * H + h) * D + d, (acc / tl.where(l_i > 0, l_i, 1.0)).to(out_ptr.dtype.element_ty))
    else:
        at = (b * H + h) * SPLITS + split
        tl.store(part_ptr + at * D + d, acc)
        tl.store(stat_ptr + at * 2, m_i)
        tl.store(stat_ptr + at * 2 + 1, l_i)


@triton.jit
def _combine_kernel(part_ptr, stat_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Merge the per-split softmax states (max, sum, weighted values) of one head of one row."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    h = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)  # (row, head) flattened
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    m = tl.load(stat_ptr + (h * SPLITS + sp) * 2)
    l = tl.load(stat_ptr + (h * SPLITS + sp) * 2 + 1)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all > float("-inf"), m_all, 0.0)  # an idle row's splits are all empty
    w = tl.where(l > 0, tl.exp(m - m_all), 0.0)
    acc = tl.load(part_ptr + (h * SPLITS + sp)[:, None] * D + d[None, :])
    total = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # idle rows (all l == 0): zeros
    tl.store(out_ptr + h * D + d, out.to(out_ptr.dtype.element_ty))


def split_plan(s_max: int, block_s: int = 64, max_splits: int = 16, min_chunk: int = 256) -> tuple[int, int]:
    """(splits, chunk) for a cache of s_max positions: one split up to 2 * min_chunk positions, else
    enough splits of at least min_chunk positions (a power of two, at most max_splits)."""
    if s_max <= 2 * min_chunk:
        return 1, triton.cdiv(s_max, block_s) * block_s
    splits = min(max_splits, triton.next_power_of_2(triton.cdiv(s_max, min_chunk)))
    chunk = triton.cdiv(triton.cdiv(s_max, splits), block_s) * block_s
    return splits, chunk


def attention_decode(qkv: Tensor, rope: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                     n_heads: int, n_kv_heads: int, scale: float, block_s: int = 64, min_chunk: int = 256,
                     row: int = 0) -> Tensor:
    """One decode step of attention for B sequences, each at its own position, in cache rows
    [row, row + B) (B = 1: the batch-1 step).

    qkv: (B, (H + 2 H_kv) * D) (or ((H + 2 H_kv) * D,) for B = 1), the fused q/k/v projection
    output (before RoPE), contiguous; rope: (B, D/2, 2) float32 cos/sin for each row's position (any
    shape of B * D contiguous floats); input_pos: (B,) positions (any shape of B), a negative one
    marking an idle row (nothing written or read; zeros out: what the batched engine gives the rows of
    a decode bucket that hold no sequence); k_cache, v_cache: (B_max, H_kv, S_max, D), updated in place at those positions. Contexts longer than 2 * min_chunk
    are split. Returns (B, H * D) in the cache dtype ((H * D,) for a one-dimensional qkv)."""
    s_max, head_dim = k_cache.shape[2], k_cache.shape[3]
    rows = input_pos.numel()
    if qkv.numel() != rows * (n_heads + 2 * n_kv_heads) * head_dim or rope.numel() != rows * head_dim:
        raise ValueError(f"attention_decode: qkv {tuple(qkv.shape)} / rope {tuple(rope.shape)} "
                         f"do not hold {rows} rows of positions")
    if row + rows > k_cache.shape[0]:
        raise ValueError(f"attention_decode: rows [{row}, {row + rows}) past the cache's {k_cache.shape[0]}")
    splits, chunk = split_plan(s_max, block_s, min_chunk=min_chunk)
    shape = (n_heads * head_dim,) if qkv.dim() == 1 else (rows, n_heads * head_dim)
    out = torch.empty(shape, dtype=k_cache.dtype, device=qkv.device)
    if splits > 1:
        part = torch.empty(rows * n_heads * splits * head_dim, dtype=torch.float32, device=qkv.device)
        stat = torch.empty(rows * n_heads * splits * 2, dtype=torch.float32, device=qkv.device)
    else:
        part = stat = out
    pdl = pdl_enabled(qkv)
    _attn_decode_kernel[(n_heads, splits, rows)](
        qkv, rope, input_pos, k_cache, v_cache, out, part, stat,
        s_max, chunk, scale, row,
        H=n_heads, HKV=n_kv_heads, D=head_dim, SPLITS=splits, BLOCK_S=block_s, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    if splits > 1:
        _combine_kernel[(n_heads, rows)](part, stat, out, D=head_dim, SPLITS=splits, PDL=pdl, num_warps=4,
                                         launch_pdl=pdl)
    return out
