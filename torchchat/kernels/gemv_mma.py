"""Products of a few input rows with one int4 weight on the tensor cores, one `tl.dot` per weight
tile: Y = epilogue(prologue(X) W^T), X (M, K), for the small-batch decode of int4 weights.

Why a third kernel beside gemv_rows.py's "dot" and gemv_few.py's "fma": the dot kernel multiplies
each nibble field of a tile separately (eight tl.dot calls a step on (rows, words) slices with
gathered input columns), and every field stages both operands through shared memory (sm_90a: 16
local_allocs, 48 ldmatrix, 40 shared stores and 16 barriers a step at 64x512w8); the fma kernel
avoids the staging but spends an FMA per weight and input row. Here one loop step loads a
(BLOCK_N, BLOCK_K) weight tile, unpacks and dequantizes all eight nibble fields in registers, joins
them (`tl.join`: the new axis stays in the thread that holds the word) and multiplies once, with
no data movement between the load and the tensor cores:

- The weights are the MMA's M side, (BLOCK_N, BLOCK_K) @ (BLOCK_K, 16 input rows): the big operand
  is the one built in registers, the small one (the input rows, shared by every weight row) is
  staged in shared memory, once a step.
- A dot's sum does not depend on the order of its K axis as long as both operands share it, and
  the order of the weight rows is the program's own; both are chosen so that each lane already holds
  what the MMA's register operand wants it to hold: the words are loaded as a (NB, S, 2, NW, 8, 4, 4)
  tile (16-word blocks, row 16 NW s + 16 w + 8 r + g, word 16 b + 4 q + v), which Triton's default
  layout gives 4 words a thread, lanes (g, q) and warps w, exactly the rows and the column quads of
  warp w's lanes in the MMA operand; the operand's columns are then (b, v, c, h, q, e) for nibble
  c + 2 h + 4 e (warpgroup MMA, 4 or 8 warps) or (b, v, c, q, h, e) (warp MMA, 1 or 2 warps, whose
  lanes hold 4 consecutive columns), so the conversion to the operand layout is a renaming of
  registers (sm_90a: no shared memory, no shuffles for the weights). The input rows are gathered
  in the same column order: for group 128 loaded contiguously and renamed, else index by index.
- On CUDA with a 16-bit model the weights are dequantized two at a time in one 32-bit register
  (_pair: 3 instructions a pair against 7 in float32; the pair is the operand's two halves, e = 0, 1),
  else in float32 (_field), which the CPU interpreter runs.

Roundings: each weight is q * s + m rounded once to the model dtype, as formats.dequantize rounds it
(in float32 then to the model dtype: the same value for bf16, whose q * s + m is exact in float32;
see _pair), and the products accumulate in float32: the dot kernel's numerics, up to summation order.
The prologue and epilogues are gemv_rows.py's own helpers.

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
def _pair(words2, s2, m2, I: tl.constexpr):
    """Nibbles I and I + 4 of every word, dequantized to the model dtype in pairs, (..., 2).

    words2, s2, m2: each word, scale and minimum (in the model dtype) twice along a new minor axis,
    so that one asm instance (pack=2) makes both halves of one 32-bit register: one lop3 puts nibble
    I in the low and nibble I + 4 in the high 16 bits, as the mantissas of 128 + q (bf16) or 1024 + q (fp16); one
    packed FMA subtracts that bias exactly and a second computes q * s + m with a single rounding.
    formats.dequantize rounds the float32 q * s + m to the model dtype instead; in bf16 that is the
    same value: with q 4 bits and s, m 8, the float32 sum is exact unless q * s < 2^-12 |m|, and then
    both round to m. fp16 (11-bit s and m) may differ by a unit in rare cases."""
    if s2.dtype == tl.bfloat16:
        magic: tl.constexpr = "0x43004300"  # 128.0, twice
        one: tl.constexpr = "0x3F803F80"
        bias: tl.constexpr = "0xC300C300"  # -128.0
        kind: tl.constexpr = "bf16x2"
    else:
        magic: tl.constexpr = "0x64006400"  # 1024.0
        one: tl.constexpr = "0x3C003C00"
        bias: tl.constexpr = "0xE400E400"  # -1024.0
        kind: tl.constexpr = "f16x2"
    if I == 0:
        shift: tl.constexpr = "0"
    elif I == 1:
        shift: tl.constexpr = "4"
    elif I == 2:
        shift: tl.constexpr = "8"
    else:
        shift: tl.constexpr = "12"
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t, u, c1, cb; shr.u32 t, $1, " + shift + "; mov.b32 c1, " + one + "; mov.b32 cb, "
        + bias + "; lop3.b32 u, t, 0x000F000F, " + magic + ", 0xEA; fma.rn." + kind + " u, u, c1, cb; fma.rn."
        + kind + " $0, u, $3, $4; }",
        "=r,r,r,r,r", [words2, s2, m2], dtype=s2.dtype, is_pure=True, pack=2,
    )


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
def _mma_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, row0, N, ROWS2, m64, mmask, K, KW, KB, KG0, KG, eps,
              NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
              IEEE: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr, NW: tl.constexpr,
              DEPTH: tl.constexpr, HALVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """(HALVES * BLOCK_N, BLOCK_M) float32 products of weight rows row0 + [0, BLOCK_N) (and, with
    HALVES = 2, then of rows ROWS2 + row0 + [0, BLOCK_N): SwiGLU's w3 half, in the same dot, so that
    both halves share the steps, the input tile and one ring of loads) with the prologue'd input rows
    m64, over the groups [KG0, KG) of each row (of KB); rows past N (of each half) give zeros. Also returns the
    (BLOCK_M,) sums of the squared inputs of those groups (NORM 2's, zeros otherwise): the caller scales
    by 1/rms once every group's share is in."""
    dt = x_ptr.dtype.element_ty
    WS: tl.constexpr = GROUP // 8
    NB: tl.constexpr = BLOCK_K // 128  # blocks of 16 words (one per quad of lanes)
    S: tl.constexpr = HALVES * BLOCK_N // (16 * NW)
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
    local = row % BLOCK_N
    rmask = row0 + local < N
    rows64 = (row0 + local + (row // BLOCK_N) * ROWS2).to(tl.int64)
    wgrp = word // WS
    sgrp = (16 * bb + 4 * _ar(4, 5, 7)) // WS  # a word's group does not depend on v (WS >= 4)
    soff = rows64 * KB + sgrp
    base = w_ptr + rows64 * KW + word
    STEP: tl.constexpr = BLOCK_K // GROUP  # groups a step
    # A ring of DEPTH steps of words in flight (w1 the next to use), rotated by one each step. Weights
    # never depend on the previous kernel: the first DEPTH steps are loaded before waiting on it.
    w1 = tl.load(base + KG0 * WS, mask=rmask & (KG0 + wgrp < KG), other=0)
    if DEPTH >= 2:
        w2 = tl.load(base + (KG0 + STEP) * WS, mask=rmask & (KG0 + STEP + wgrp < KG), other=0)
    if DEPTH >= 3:
        w3 = tl.load(base + (KG0 + 2 * STEP) * WS, mask=rmask & (KG0 + 2 * STEP + wgrp < KG), other=0)
    if DEPTH >= 4:
        w4 = tl.load(base + (KG0 + 3 * STEP) * WS, mask=rmask & (KG0 + 3 * STEP + wgrp < KG), other=0)
    _wait(PDL)
    # NORM 2 scales the finished sums by 1/rms(x): the squares are summed from the input tiles the
    # loop loads anyway (ss), not in a pass of their own over 16 rows of K inputs before it, which
    # each program would read from L2 (up to 128 kB a program at 16 rows, as much as its weights).
    rstd = _rstd_rows(x_ptr, m64, mmask, K, eps, NORM if NORM == 1 else 0, NORM_BLOCK, BLOCK_M)
    ss = tl.zeros([BLOCK_M, BLOCK_K // 8], tl.float32)
    # Operand column 128 b + 32 v + 16 c + 8 h + 2 q + e holds nibble t = c + 2 h + 4 e of word
    # 16 b + 4 q + v: its input (within the step) is (word // WS) * GROUP + t * WS + word % WS.
    cc = tl.arange(0, BLOCK_K)
    if V3:
        cw = 16 * (cc // 128) + 4 * ((cc // 2) % 4) + (cc // 32) % 4
        ct = (cc // 16) % 2 + 2 * ((cc // 8) % 2) + 4 * (cc % 2)
    else:
        cw = 16 * (cc // 128) + 4 * ((cc // 4) % 4) + (cc // 32) % 4
        ct = (cc // 16) % 2 + 2 * ((cc // 2) % 2) + 4 * (cc % 2)
    col = (cw // WS) * GROUP + ct * WS + cw % WS
    xrow = m64[:, None] * K
    acc = tl.zeros([HALVES * BLOCK_N, BLOCK_M], tl.float32)
    KEND = KG * GROUP  # this slice's inputs end here (its weights past it are masked to zero too)
    for g0 in range(KG0, KG, STEP):
        words = w1
        if DEPTH >= 2:
            w1 = w2
        if DEPTH >= 3:
            w2 = w3
        if DEPTH >= 4:
            w3 = w4
        # Scales are loaded where they are used: prefetched with the words (as bf16 or float32) they
        # cost ~45 more registers a thread at 64x256w4 (sm_90a, float32 dequantization).
        smask = rmask & (g0 + sgrp < KG)
        s = tl.load(s_ptr + soff + g0, mask=smask, other=0.0)
        mn = tl.load(m_ptr + soff + g0, mask=smask, other=0.0)
        # Operand axes (c, h, e) appended to each word: nibble t = c + 2 h + 4 e of the word.
        if PACKED:
            # e is the pair axis, the two halves of one register: (e, c, h) built, then renamed.
            wpair = tl.join(words, words)
            s2 = tl.broadcast_to(s.to(dt), words.shape)
            s2 = tl.join(s2, s2)
            m2 = tl.broadcast_to(mn.to(dt), words.shape)
            m2 = tl.join(m2, m2)
            f = tl.join(tl.join(_pair(wpair, s2, m2, 0), _pair(wpair, s2, m2, 1)),
                        tl.join(_pair(wpair, s2, m2, 2), _pair(wpair, s2, m2, 3)))
            f = tl.permute(f, 0, 1, 2, 3, 4, 5, 6, 8, 9, 7)
        else:
            s = s.to(tl.float32)
            mn = mn.to(tl.float32)
            high = words >> 12  # nibbles 5..7 down to bits 8..19 (_unpack takes fields below bit 23)
            # e joined last, so the minor register axis: each float32 pair (e = 0, 1) rounds into one
            # 32-bit register of two halves, as the operand holds it.
            f = tl.join(tl.join(tl.join(_field(words, high, 0, s, mn, ASM), _field(words, high, 1, s, mn, ASM)),
                                tl.join(_field(words, high, 2, s, mn, ASM), _field(words, high, 3, s, mn, ASM))),
                        tl.join(tl.join(_field(words, high, 4, s, mn, ASM), _field(words, high, 5, s, mn, ASM)),
                                tl.join(_field(words, high, 6, s, mn, ASM), _field(words, high, 7, s, mn, ASM))))
            f = f.to(dt)
        # (b, s, r, w, g, q, v, c, h, e) -> rows (s, w, r, g), columns (b, v, c, h, q, e)
        if V3:
            w = tl.reshape(tl.permute(f, 1, 3, 2, 4, 0, 6, 7, 8, 5, 9), [HALVES * BLOCK_N, BLOCK_K])
        else:
            w = tl.reshape(tl.permute(f, 1, 3, 2, 4, 0, 6, 7, 5, 8, 9), [HALVES * BLOCK_N, BLOCK_K])
        if WS == 16:
            # Group 128: the step's inputs in order are (b, e, h, c, q, v) (input 16 t + word within
            # a group): loaded contiguously, then only renamed into the operand's column order.
            idx = g0 * GROUP + cc
            xv = _load_xm(x_ptr, g_ptr, xrow + idx[None, :], idx[None, :], mmask[:, None] & (idx < KEND)[None, :],
                          rstd[:, None], NORM)
            if NORM == 2:  # 8 neighbours at a time: each thread's own contiguous inputs
                ss += tl.sum(tl.reshape(xv.to(tl.float32) * xv.to(tl.float32), [BLOCK_M, BLOCK_K // 8, 8]), 2)
            xv = tl.reshape(xv, [BLOCK_M, NB, 2, 2, 2, 4, 4])
            if V3:
                xv = tl.reshape(tl.permute(xv, 0, 1, 6, 4, 3, 5, 2), [BLOCK_M, BLOCK_K])
            else:
                xv = tl.reshape(tl.permute(xv, 0, 1, 6, 4, 5, 3, 2), [BLOCK_M, BLOCK_K])
        else:  # other groups: each column gathered from its input
            idx = g0 * GROUP + col
            xv = _load_xm(x_ptr, g_ptr, xrow + idx[None, :], idx[None, :], mmask[:, None] & (idx < KEND)[None, :],
                          rstd[:, None], NORM)
            if NORM == 2:  # every input of the step once, in another order
                ss += tl.sum(tl.reshape(xv.to(tl.float32) * xv.to(tl.float32), [BLOCK_M, BLOCK_K // 8, 8]), 2)
        ahead = g0 + DEPTH * STEP
        nxt = tl.load(base + ahead * WS, mask=rmask & (ahead + wgrp < KG), other=0)
        if DEPTH == 1:
            w1 = nxt
        elif DEPTH == 2:
            w2 = nxt
        elif DEPTH == 3:
            w3 = nxt
        else:
            w4 = nxt
        if IEEE:  # float32 models, and the CPU interpreter (see gemv_rows._mdot)
            acc = tl.dot(w.to(tl.float32), tl.trans(xv.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(xv), acc)
    return acc, tl.sum(ss, 1)


# One compiled kernel for every M and for w2's odd number of groups (KB only offsets the scales).
@triton.jit(do_not_specialize=["M", "KB", "KSL"])
def _gemv_mma_kernel(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, r_ptr, y_ptr, part_ptr, count_ptr,
                     M, N, K, KW, KB, KSL, ROWS2, eps, res_scale, SPLIT: tl.constexpr,
                     GROUP: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                     IEEE: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, PACKED: tl.constexpr,
                     NW: tl.constexpr, DEPTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """Outputs [pid0*BLOCK_N, ...) of input rows [pid1*BLOCK_M, ...): X (M, K), Y (M, N); with SPLIT > 1,
    the share of groups [pid2*KSL, ...) of each row, the last of the SPLIT programs of a tile to finish
    adding up all shares (from part_ptr) and running the epilogue."""
    if PDL:  # let the next kernel's programs get ready as soon as all of ours have started
        tl.extra.cuda.gdc_launch_dependents()
    HB: tl.constexpr = (2 if SWIGLU else 1) * BLOCK_N
    row0 = tl.program_id(0) * BLOCK_N
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    m64 = m.to(tl.int64)
    kg0 = tl.program_id(2) * KSL
    acc, ssum = _mma_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, row0, N, ROWS2, m64, mmask, K, KW, KB, kg0,
                          tl.minimum(kg0 + KSL, KB), eps, NORM, NORM_BLOCK, PDL, ASM, IEEE, PACKED, GROUP, NW,
                          DEPTH, 2 if SWIGLU else 1, BLOCK_M, BLOCK_N, BLOCK_K)
    if SPLIT > 1:
        # Split K: every program stores its share; the tile's counter tells the last one to arrive,
        # which sums the SPLIT shares (in slice order: the same sum whichever program is last) and
        # resets the counter for the next launch (CUDA graphs replay the same buffers).
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        PART: tl.constexpr = HB * BLOCK_M + BLOCK_M
        own = part_ptr + (tile * SPLIT + tl.program_id(2)) * PART
        ai = tl.arange(0, HB)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(own + ai, acc)
        tl.store(own + HB * BLOCK_M + tl.arange(0, BLOCK_M), ssum)
        tl.debug_barrier()  # every thread's share stored before the release below
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            acc = tl.zeros([HB, BLOCK_M], tl.float32)
            ssum = tl.zeros([BLOCK_M], tl.float32)
            first = part_ptr + tile * SPLIT * PART
            for j in range(SPLIT):
                acc += tl.load(first + j * PART + ai, cache_modifier=".cg")
                ssum += tl.load(first + j * PART + HB * BLOCK_M + tl.arange(0, BLOCK_M), cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)
            _mma_finish(acc, ssum, x_ptr, r_ptr, y_ptr, row0, m64, mmask, N, K, eps, res_scale, NORM, SWIGLU,
                        RESIDUAL, BLOCK_M, BLOCK_N)
    else:
        _mma_finish(acc, ssum, x_ptr, r_ptr, y_ptr, row0, m64, mmask, N, K, eps, res_scale, NORM, SWIGLU,
                    RESIDUAL, BLOCK_M, BLOCK_N)


@triton.jit
def _mma_finish(acc, ssum, x_ptr, r_ptr, y_ptr, row0, m64, mmask, N, K, eps, res_scale, NORM: tl.constexpr,
                SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue of a tile's whole product acc (HALVES * BLOCK_N, BLOCK_M); ssum: NORM 2's sums of
    squared inputs per input row."""
    if NORM == 2:  # the norm weight is folded into W: norm(x) W^T = rstd * (x W^T)
        acc = acc * (1.0 / tl.sqrt(ssum / K + eps))[None, :]
    if SWIGLU:  # rows [0, BLOCK_N) of the product are w1's, the next BLOCK_N w3's
        y, up = tl.split(tl.permute(tl.reshape(acc, [2, BLOCK_N, BLOCK_M]), 1, 2, 0))
    else:
        y = acc
        up = y
    rows = row0 + tl.arange(0, BLOCK_N)
    _store_rows(tl.trans(y), tl.trans(up), x_ptr, r_ptr, y_ptr, m64, mmask, rows.to(tl.int64), rows < N, N,
                res_scale, SWIGLU, RESIDUAL)


# Tiles (weight rows per program, inputs per step, warps, weight steps loaded ahead), looked up as
# "int4:swiglu" (the stacked w1|w3 product: two products a program), "int4:small" (at most SMALL_N
# outputs: a 7B model's wo and w2), then "int4". Swept on the H100 (sixth session, 2026-12-06,
# bench/cuda_rows_bench.py --kernels fma mma): one warp and 16 rows a program (8 of each half with
# SwiGLU), four steps loaded ahead. First sweep (8 rows, 256 inputs a step everywhere): 9.47 ms for
# the fused 8-row 7B step against 11.70 for gemv_few's fma kernel; second sweep (its neighbours):
# 128 inputs a step for "int4" and "int4:small", 8.75 ms at 4 and 8 rows and 9.15 at 16, against fma's
# 9.81 / 11.66 / 23.59 in the same run. Tiles of 64-128 rows give a 4096-row layer 32-64 programs for
# 132 SMs and took 11.7-14.5 ms; 16x512w1a4 (twice the registers
# for the ring) 14.5. block_n rows (with swiglu 2 block_n: both halves are one product) are a multiple
# of 16 a warp (a warp's MMA rows); 4 or 8 warps take Hopper's warpgroup MMA, 1 or 2 the warp-level
# one. block_k is a multiple of 128 and of the group. The 4th field (GemvConfig.num_stages) is how
# many steps of weights the loop loads ahead by hand, 1 to 4, not Triton's pipeliner, which stays
# off. Override with
# TORCHCHAT_GEMV_MMA_TILES='{"int4": [block_n, block_k, num_warps(, ahead)], "int4:small": [...], ...}'.
SMALL_N = 8192
_CONFIGS = {
    "int4": GemvConfig(block_n=16, block_k=128, num_warps=1, num_stages=4),
    "int4:small": GemvConfig(block_n=16, block_k=128, num_warps=1, num_stages=4),
    "int4:swiglu": GemvConfig(block_n=8, block_k=256, num_warps=1, num_stages=4),  # 8 rows of each half
}


# Split K: a 4096-row layer at 16 rows a program is 256 one-warp programs, about two warps per SM of an
# H100: too few loads in flight to stream the weights at full speed (~330 GB/s at 8 rows). Each tile's K
# is then shared by `split` programs, so that about SPLIT_TARGET programs run, each at least
# SPLIT_MIN_STEPS loop steps long. Whole 7B int4 steps at 8 / 16 rows (H100, seventh session,
# bench/cuda_batch_bench.py): no split 10.64 / 10.96 ms, target 1024 7.36 / 7.78, 2048 6.73-6.74 /
# 7.25, 4096 6.57 / 7.04, 8192 6.82 / 7.31. TORCHCHAT_MMA_SPLIT_TARGET overrides the target (0: never
# split).
SPLIT_TARGET = 4096
SPLIT_MIN_STEPS = 4


def pick_split(tiles: int, steps: int) -> int:
    """How many programs share each of `tiles` tiles' `steps` loop steps."""
    text = os.environ.get("TORCHCHAT_MMA_SPLIT_TARGET", "")
    try:
        target = int(text) if text else SPLIT_TARGET
    except ValueError:
        raise MmaRowsError(f"TORCHCHAT_MMA_SPLIT_TARGET={text!r}: expected a whole number of programs (0: never split)") from None
    if target <= tiles:
        return 1
    return max(1, min(triton.cdiv(target, tiles), steps // SPLIT_MIN_STEPS))


_COUNTERS: dict[torch.device, Tensor] = {}


def _counters(device: torch.device, tiles: int) -> Tensor:
    """Per-tile arrival counters of the split-K kernel: zeros, and zeros again after every launch (the
    last program of a tile resets its own), so one buffer serves every launch and CUDA graph replay on
    the device. Launches on one stream run one after another (with PDL a kernel touches the counters
    only after waiting for the previous one), which is what lets them share it."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise MmaRowsError("the split-K counters are made outside CUDA graph capture: run the shapes once first")
        buf = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def packed_dequant(x: Tensor) -> bool:
    """Whether the weights are dequantized two at a time in 16-bit registers (_pair: PTX, so CUDA
    only, 16-bit models only), else in float32 (_field). TORCHCHAT_MMA_PACKED=0 forces float32."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and os.environ.get("TORCHCHAT_MMA_PACKED") != "0"


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
    block_n = max(16 * base.num_warps // (2 if swiglu else 1), min(base.block_n, triton.next_power_of_2(n)))
    return GemvConfig(block_n, block_k, base.num_warps, base.num_stages)


def gemv_mma(x: Tensor, fmt: str, groupsize: int, weight: Tensor, scales: Tensor | None = None,
             mins: Tensor | None = None, *, norm_weight: Tensor | None = None, eps: float = 0.0,
             rms_only: bool = False, swiglu: bool = False, residual: Tensor | None = None,
             res_scale: float = 1.0, out_dtype: torch.dtype | None = None,
             config: GemvConfig | None = None, split: int | None = None) -> Tensor:
    """Y = epilogue(prologue(X) W^T) for the rows of X on the tensor cores, one dot per weight tile,
    each tile read once per 16 rows. Arguments and result as gemv_rows.gemv_rows's: x (M, K)
    contiguous in the model dtype -> (M, N) in `out_dtype` (default x's dtype). int4 only
    (MmaRowsError otherwise). `split`: programs sharing each tile's K (default: pick_split's)."""
    if fmt not in FORMATS:
        raise MmaRowsError(f"the one-dot tensor-core kernel takes {', '.join(FORMATS)}, not {fmt!r}")
    m, k = x.shape
    n_w = weight.shape[0]
    n = n_w // 2 if swiglu else n_w
    block = pack_block(fmt, groupsize)
    cfg = config or pick_mma_config(fmt, n, k, block, swiglu)
    halves = 2 if swiglu else 1
    if (cfg.block_k % max(block, 128) or halves * cfg.block_n % (16 * cfg.num_warps)
            or cfg.num_stages not in (1, 2, 3, 4)):
        raise MmaRowsError(f"tile {cfg.block_n}x{cfg.block_k}w{cfg.num_warps}a{cfg.num_stages}: the step must be a "
                           f"multiple of 128 inputs and of the group ({block}), the rows (of both halves with swiglu) "
                           "a multiple of 16 per warp, the steps loaded ahead 1 to 4")
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, BLOCK_M)
    kb = k // block
    step_groups = cfg.block_k // block
    steps = triton.cdiv(kb, step_groups)
    split = max(1, min(pick_split(tiles, steps) if split is None else split, steps))
    ksl = triton.cdiv(steps, split) * step_groups  # groups a slice: whole steps
    split = triton.cdiv(kb, ksl)  # (so that no slice is empty)
    if split > 1:
        part = torch.empty(tiles * split * (halves * cfg.block_n + 1) * BLOCK_M, dtype=torch.float32, device=x.device)
        counts = _counters(x.device, tiles)
    else:
        part = counts = out  # not read
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, BLOCK_M), split)
    use_pdl = pdl_enabled(x)
    _gemv_mma_kernel[grid](
        x, norm_weight if norm_weight is not None else x, weight, scales, mins,
        residual if residual is not None else x, out, part, counts,
        m, n, k, weight.shape[1], kb, ksl, n, eps, res_scale, SPLIT=split,
        GROUP=block, NORM=2 if rms_only else int(norm_weight is not None), SWIGLU=swiglu,
        RESIDUAL=residual is not None, IEEE=x.dtype == torch.float32 or not x.is_cuda, PDL=use_pdl,
        ASM=x.is_cuda, PACKED=packed_dequant(x), NW=cfg.num_warps, DEPTH=cfg.num_stages, BLOCK_M=BLOCK_M,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NORM_BLOCK=min(512, triton.next_power_of_2(k)),
        num_warps=cfg.num_warps, num_stages=1, launch_pdl=use_pdl,
    )
    return out
