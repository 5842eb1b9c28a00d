"""Products of a few input rows with one int4 weight on the tensor cores, one `tl.dot` per weight
tile: Y = epilogue(prologue(X) W^T), X (M, K), for the small-batch decode of int4 weights.

Why a third kernel beside gemv_rows.py's "dot" and gemv_few.py's "fma": the dot kernel multiplies
each nibble field of a tile separately (eight tl.dot calls a step, each on a (rows, words) slice
whose input columns are gathered with a stride of GROUP/8), so every field of every step changes
the layout of both operands through shared memory; the fma kernel avoids that but spends one FMA
per weight and input row on the CUDA cores, which at 8 rows is the limit (H100 figures in
gemv_rows.ROWS_KERNELS). Here the eight fields of each loaded word are unpacked, dequantized and
joined in registers into one (BLOCK_N, BLOCK_K) operand (`tl.join`: the new dimension stays in the
thread that holds the word) and multiplied once per step. A dot's sum does not care about the order
of its K dimension as long as both operands share it, so the operand's columns are in packed order,
not input order: column 8 j + t is nibble t of the tile's word j, i.e. input
(j // WS) * GROUP + t * WS + j % WS with WS = GROUP / 8 words a group, and the input rows are
gathered in that order (a fixed index per tile, read from L1/L2; the inputs are a few kB).

The weights are the dot's left operand (M side, W_LEFT): (BLOCK_N, BLOCK_K) @ (BLOCK_K, BLOCK_M)
with BLOCK_M = 16 input rows (tl.dot's smallest N), so the big operand is the one built in registers
and the small one (the input rows, the same for every weight row) is the one staged in shared memory.
W_LEFT=False puts the input rows on the M side as gemv_rows does, for comparison
(bench/few_rows_sm90_report.py counts both).

Roundings: each weight is dequantized to the model dtype as formats.dequantize computes it (q * s + m
in float32, one rounding), the products accumulate in float32 (the dot kernel's numerics, up to
summation order). The prologue and epilogues are gemv_rows.py's own helpers.

Import only on CUDA machines (or with TRITON_INTERPRET=1 for the CPU tests): this module imports triton.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchchat.kernels.formats import pack_block
from torchchat.kernels.gemv import GemvConfig, _unpack, _wait, pdl_enabled
from torchchat.kernels.gemv_rows import _load_xm, _rstd_rows, _store_rows

FORMATS = ("int4",)
BLOCK_M = 16  # input rows per program: tl.dot's smallest N (and M)


class MmaRowsError(ValueError):
    """A format or tile the one-dot int4 kernel does not take."""


@triton.jit
def _field(words, high, I: tl.constexpr, s, mn, ASM: tl.constexpr):
    """Nibble I of every word, dequantized in float32: q * s + m (the caller rounds it once to the
    model dtype, as formats.dequantize does)."""
    if I < 5:
        q = _unpack(words, 4 * I, 4, ASM)
    else:
        q = _unpack(high, 4 * I - 12, 4, ASM)
    return q * s + mn


@triton.jit
def _ar(N: tl.constexpr, AXIS: tl.constexpr, RANK: tl.constexpr):
    """arange(N) as a rank-RANK tensor along AXIS (size 1 elsewhere)."""
    v = tl.arange(0, N)
    if RANK == 7:
        if AXIS == 0:
            v = v[:, None, None, None, None, None, None]
        elif AXIS == 1:
            v = v[None, :, None, None, None, None, None]
        elif AXIS == 2:
            v = v[None, None, :, None, None, None, None]
        elif AXIS == 3:
            v = v[None, None, None, :, None, None, None]
        elif AXIS == 4:
            v = v[None, None, None, None, :, None, None]
        elif AXIS == 5:
            v = v[None, None, None, None, None, :, None]
        else:
            v = v[None, None, None, None, None, None, :]
    return v


@triton.jit
def _mma_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, row0, N, m64, mmask, K, KW, KG, eps,
              NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
              IEEE: tl.constexpr, GROUP: tl.constexpr, NW: tl.constexpr, DEPTH: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_M) float32 products of weight rows row0 + [0, BLOCK_N) with the prologue'd
    input rows m64."""
    dt = x_ptr.dtype.element_ty
    WS: tl.constexpr = GROUP // 8
    NB: tl.constexpr = BLOCK_K // 128  # blocks of 16 words (one per quad of lanes)
    S: tl.constexpr = BLOCK_N // (16 * NW)
    # Hopper's warpgroup MMA (4 warps a group) spreads each lane's operand columns as (2 q + e, + 8 h);
    # the warp-level MMA (fewer warps) takes them as (4 q + 2 h + e) (kWidth 4): the column order
    # follows, so that either way the operand needs no data movement.
    V3: tl.constexpr = NW % 4 == 0
    # The words as a (NB, S, 2, NW, 8, 4, 4) tile: block b, row 16 NW s + 16 w + 8 r + g (the rows
    # warp w's lanes g = lane / 4 hold in the MMA operand), word 16 b + 4 q + v of the step. Loaded
    # 4 words a thread, 4 threads along q, 8 along g, warps along w: the lanes hold what the operand
    # layout wants them to hold (module docstring), so only register renaming is left.
    bb = _ar(NB, 0, 7)
    row = 16 * NW * _ar(S, 1, 7) + 8 * _ar(2, 2, 7) + 16 * _ar(NW, 3, 7) + _ar(8, 4, 7)
    word = 16 * bb + 4 * _ar(4, 5, 7) + _ar(4, 6, 7)
    rmask = row0 + row < N
    rows64 = (row0 + row).to(tl.int64)
    wgrp = word // WS
    sgrp = (16 * bb + 4 * _ar(4, 5, 7)) // WS  # a word's group does not depend on v (WS >= 4)
    soff = rows64 * KG + sgrp
    base = w_ptr + rows64 * KW + word
    STEP: tl.constexpr = BLOCK_K // GROUP  # groups a step
    # Weights never depend on the previous kernel: the first steps are loaded
    # before waiting on it (gemv.py), DEPTH steps ahead of their use from then on.
    words_next = tl.load(base, mask=rmask & (wgrp < KG), other=0)
    if DEPTH == 2:
        words_next2 = tl.load(base + STEP * WS, mask=rmask & (STEP + wgrp < KG), other=0)
    _wait(PDL)
    rstd = _rstd_rows(x_ptr, m64, mmask, K, eps, NORM, NORM_BLOCK, BLOCK_M)
    # Operand column 128 b + 32 v + 16 c + 8 h + 2 q + e holds nibble t = 4 c + 2 h + e of word
    # 16 b + 4 q + v: its input (within the step) is (word // WS) * GROUP + t * WS + word % WS.
    cc = tl.arange(0, BLOCK_K)
    if V3:
        cw = 16 * (cc // 128) + 4 * ((cc // 2) % 4) + (cc // 32) % 4
        ct = 4 * ((cc // 16) % 2) + 2 * ((cc // 8) % 2) + cc % 2
    else:
        cw = 16 * (cc // 128) + 4 * ((cc // 4) % 4) + (cc // 32) % 4
        ct = 4 * ((cc // 16) % 2) + 2 * ((cc // 2) % 2) + cc % 2
    col = (cw // WS) * GROUP + ct * WS + cw % WS
    xrow = m64[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in range(0, KG, STEP):
        words = words_next
        if DEPTH == 2:
            words_next = words_next2
        # Scales are loaded where they are used: prefetched with the words (as bf16 or float32)
        # they cost ~45 more registers a thread at 64x256w4 (sm_90a), a program fewer an SM.
        smask = rmask & (g0 + sgrp < KG)
        s = tl.load(s_ptr + soff + g0, mask=smask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + soff + g0, mask=smask, other=0.0).to(tl.float32)
        high = words >> 12  # nibbles 5..7 down to bits 8..19 (_unpack takes fields below bit 23)
        # Axes (c, h, e) appended: nibble 4 c + 2 h + e. e is joined last, so it is the minor register
        # axis: each float32 pair (e = 0, 1) rounds into one bf16x2 register, as the operand holds it.
        f = tl.join(tl.join(tl.join(_field(words, high, 0, s, mn, ASM), _field(words, high, 4, s, mn, ASM)),
                            tl.join(_field(words, high, 2, s, mn, ASM), _field(words, high, 6, s, mn, ASM))),
                    tl.join(tl.join(_field(words, high, 1, s, mn, ASM), _field(words, high, 5, s, mn, ASM)),
                            tl.join(_field(words, high, 3, s, mn, ASM), _field(words, high, 7, s, mn, ASM))))
        # (b, s, r, w, g, q, v, c, h, e) -> rows (s, w, r, g), columns (b, v, c, h, q, e)
        if V3:
            w = tl.reshape(tl.permute(f.to(dt), 1, 3, 2, 4, 0, 6, 7, 8, 5, 9), [BLOCK_N, BLOCK_K])
        else:
            w = tl.reshape(tl.permute(f.to(dt), 1, 3, 2, 4, 0, 6, 7, 5, 8, 9), [BLOCK_N, BLOCK_K])
        if WS == 16:
            # Group 128: the step's inputs in order are (b, c, h, e, q, v) (input 16 t + word within
            # a group): loaded contiguously, then only renamed into the operand's column order.
            idx = g0 * GROUP + cc
            xv = _load_xm(x_ptr, g_ptr, xrow + idx[None, :], idx[None, :], mmask[:, None] & (idx < K)[None, :],
                          rstd[:, None], NORM)
            xv = tl.reshape(xv, [BLOCK_M, NB, 2, 2, 2, 4, 4])
            if V3:
                xv = tl.reshape(tl.permute(xv, 0, 1, 6, 2, 3, 5, 4), [BLOCK_M, BLOCK_K])
            else:
                xv = tl.reshape(tl.permute(xv, 0, 1, 6, 2, 5, 3, 4), [BLOCK_M, BLOCK_K])
        else:  # other groups: each column gathered from its input
            idx = g0 * GROUP + col
            xv = _load_xm(x_ptr, g_ptr, xrow + idx[None, :], idx[None, :], mmask[:, None] & (idx < K)[None, :],
                          rstd[:, None], NORM)
        ahead = g0 + DEPTH * STEP
        if DEPTH == 2:
            words_next2 = tl.load(base + ahead * WS, mask=rmask & (ahead + wgrp < KG), other=0)
        else:
            words_next = tl.load(base + ahead * WS, mask=rmask & (ahead + wgrp < KG), other=0)
        if IEEE:  # float32 models, and the CPU interpreter (see gemv_rows._mdot)
            acc = tl.dot(w.to(tl.float32), tl.trans(xv.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(xv), acc)
    if NORM == 2:  # the norm weight is folded into W: norm(x) W^T = rstd * (x W^T)
        acc = acc * rstd[None, :]
    return acc


# One compiled kernel for every M and for w2's odd number of groups (KG only offsets the scales).
@triton.jit(do_not_specialize=["M", "KB"])
def _gemv_mma_kernel(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, r_ptr, y_ptr,
                     M, N, K, KW, KB, ROWS2, eps, res_scale,
                     GROUP: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                     IEEE: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, NW: tl.constexpr,
                     DEPTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM_BLOCK: tl.constexpr):
    """Outputs [pid0*BLOCK_N, ...) of input rows [pid1*BLOCK_M, ...): X (M, K), Y (M, N)."""
    if PDL:  # let the next kernel's programs get ready as soon as all of ours have started
        tl.extra.cuda.gdc_launch_dependents()
    row0 = tl.program_id(0) * BLOCK_N
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    m64 = m.to(tl.int64)
    y = _mma_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, row0, N, m64, mmask, K, KW, KB, eps,
                  NORM, NORM_BLOCK, PDL, ASM, IEEE, GROUP, NW, DEPTH, BLOCK_M, BLOCK_N, BLOCK_K)
    up = y
    if SWIGLU:
        up = _mma_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, row0 + ROWS2, N + ROWS2, m64, mmask, K, KW, KB, eps,
                       NORM, NORM_BLOCK, PDL, ASM, IEEE, GROUP, NW, DEPTH, BLOCK_M, BLOCK_N, BLOCK_K)
    rows = row0 + tl.arange(0, BLOCK_N)
    _store_rows(tl.trans(y), tl.trans(up), x_ptr, r_ptr, y_ptr, m64, mmask, rows.to(tl.int64), rows < N, N,
                res_scale, SWIGLU, RESIDUAL)


# Tiles (weight rows per program, inputs per step, warps), looked up as "int4:swiglu" (the stacked
# w1|w3 product: two products a program), "int4:small" (at most SMALL_N outputs: a 7B model's wo and w2,
# whose 4096 rows give few programs), then "int4". NOT MEASURED: first guesses from compiling for
# sm_90a without a GPU (bench/few_rows_sm90_report.py --kernel mma; no spills, 96-224 registers);
# bench/cuda_rows_bench.py sweeps its MMA_TILES on the GPU and prints the best per shape class.
# block_n is a multiple of 16 per warp (a warp's MMA rows); 4 or 8 warps take Hopper's warpgroup MMA,
# 1 or 2 the warp-level one (more, smaller programs). block_k is a multiple of 128 and of the group.
# The 4th field (GemvConfig.num_stages) is how many steps of weights the loop loads ahead by hand, 1
# or 2 (more bytes in flight a program, 16-32 more registers), not Triton's pipeliner, which stays off.
# Override with TORCHCHAT_GEMV_MMA_TILES='{"int4": [block_n, block_k, num_warps(, ahead)], "int4:small": ...}'.
SMALL_N = 8192
_CONFIGS = {
    "int4": GemvConfig(block_n=64, block_k=256, num_warps=4),
    "int4:small": GemvConfig(block_n=32, block_k=256, num_warps=2),
    "int4:swiglu": GemvConfig(block_n=64, block_k=256, num_warps=4),
}


def pick_mma_config(fmt: str, n: int, k: int, block: int, swiglu: bool = False) -> GemvConfig:
    """The tile for n outputs (of each half with `swiglu`) of k inputs; `block`: the int4 group."""
    if fmt not in FORMATS:
        raise MmaRowsError(f"the one-dot tensor-core kernel takes {', '.join(FORMATS)}, not {fmt!r}")
    tiles = dict(_CONFIGS)
    text = os.environ.get("TORCHCHAT_GEMV_MMA_TILES", "")
    if text:
        for key, tile in json.loads(text).items():
            tiles[key] = GemvConfig(*tile)
    key = f"{fmt}:swiglu" if swiglu else f"{fmt}:small" if n <= SMALL_N else fmt
    base = tiles.get(key) or tiles[fmt]
    block_k = max(min(base.block_k, triton.next_power_of_2(k)), block, 128)
    block_n = max(16 * base.num_warps, min(base.block_n, triton.next_power_of_2(n)))
    return GemvConfig(block_n, block_k, base.num_warps, base.num_stages)


def gemv_mma(x: Tensor, fmt: str, groupsize: int, weight: Tensor, scales: Tensor | None = None,
             mins: Tensor | None = None, *, norm_weight: Tensor | None = None, eps: float = 0.0,
             rms_only: bool = False, swiglu: bool = False, residual: Tensor | None = None,
             res_scale: float = 1.0, out_dtype: torch.dtype | None = None,
             config: GemvConfig | None = None) -> Tensor:
    """Y = epilogue(prologue(X) W^T) for the rows of X on the tensor cores, one dot per weight tile,
    each tile read once per 16 rows. Arguments and result as gemv_rows.gemv_rows's: x (M, K)
    contiguous in the model dtype -> (M, N) in `out_dtype` (default x's dtype). int4 only
    (MmaRowsError otherwise)."""
    if fmt not in FORMATS:
        raise MmaRowsError(f"the one-dot tensor-core kernel takes {', '.join(FORMATS)}, not {fmt!r}")
    m, k = x.shape
    n_w = weight.shape[0]
    n = n_w // 2 if swiglu else n_w
    block = pack_block(fmt, groupsize)
    cfg = config or pick_mma_config(fmt, n, k, block, swiglu)
    if cfg.block_k % max(block, 128) or cfg.block_n % (16 * cfg.num_warps) or cfg.num_stages not in (1, 2):
        raise MmaRowsError(f"tile {cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}: the step must be a "
                           f"multiple of 128 inputs and of the group ({block}), the rows of 16 per warp, the "
                           "steps loaded ahead 1 or 2")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, BLOCK_M))
    use_pdl = pdl_enabled(x)
    _gemv_mma_kernel[grid](
        x, norm_weight if norm_weight is not None else x, weight, scales, mins,
        residual if residual is not None else x, out,
        m, n, k, weight.shape[1], k // block, n, eps, res_scale,
        GROUP=block, NORM=2 if rms_only else int(norm_weight is not None), SWIGLU=swiglu,
        RESIDUAL=residual is not None, IEEE=x.dtype == torch.float32 or not x.is_cuda, PDL=use_pdl,
        ASM=x.is_cuda, NW=cfg.num_warps, DEPTH=cfg.num_stages, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, NORM_BLOCK=min(512, triton.next_power_of_2(k)),
        num_warps=cfg.num_warps, num_stages=1, launch_pdl=use_pdl,
    )
    return out
