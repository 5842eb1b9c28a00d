"""Batch-1 matrix-vector products (GEMV) in Triton, with the neighbouring work of a decoder layer
fused in: y = epilogue(W @ prologue(x)).

Decoding one token at batch 1 reads every weight once and does two flops per weight, so it is bound
by memory bandwidth; these kernels stream the weight in its stored format (formats.py), dequantize in
registers and accumulate in float32. Fused around the product:

- prologue RMSNorm of x (each program reduces the whole vector, which is L2-resident): exactly as
  the RMSNorm module rounds it (NORM 1), or, for integer formats whose weight has the norm weight
  folded into its columns (transform.py), only the final scaling by 1/rms(x) (NORM 2);
- epilogue `swiglu`: the weight is [w1; w3] stacked, the output is silu(w1 x) * (w3 x);
- epilogue `residual`: out = residual + res_scale * (W x).

Otherwise roundings follow the unfused PyTorch modules (each module's output rounded to the model
dtype), so the float format matches eager decoding up to float32 summation order.

Import only on CUDA machines (or with TRITON_INTERPRET=1 for the CPU tests): this module imports triton.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchchat.kernels.formats import pack_block

_FMT_CODE = {"float": 0, "int8": 1, "int4": 2, "int8_asym": 3}


def pdl_enabled(x: Tensor) -> bool:
    """Programmatic dependent launch (Hopper and newer): each kernel's programs get scheduled while
    the previous kernel finishes, and wait (griddepcontrol) only before reading its results.
    TORCHCHAT_PDL=0 turns it off."""
    return x.is_cuda and _pdl_device(x.device.index or 0)


@functools.lru_cache(maxsize=None)
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and os.environ.get("TORCHCHAT_PDL", "1") != "0"


@triton.jit
def _rstd(x_ptr, K, eps, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) over the K entries of x (1.0 without NORM). BLOCK covers rows up to
    8192 wide in one pass, so all the loads are in flight at once."""
    if NORM:
        acc = tl.zeros([BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            acc += xv * xv
        r = 1.0 / tl.sqrt(tl.sum(acc, 0) / K + eps)
    else:
        r = 1.0
    return r


@triton.jit
def _load_x(x_ptr, g_ptr, idx, mask, rstd, NORM: tl.constexpr):
    """x[idx] as float32; with NORM == 1, RMSNorm'd with weight g, rounded as the RMSNorm module
    rounds. (NORM == 2 scales the finished product by rstd instead: see _scale_rms.)"""
    xv = tl.load(x_ptr + idx, mask=mask, other=0.0)
    if NORM == 1:
        dt = x_ptr.dtype.element_ty
        xv = (xv.to(tl.float32) * rstd).to(dt)
        gv = tl.load(g_ptr + idx, mask=mask, other=0.0)
        xv = (xv.to(tl.float32) * gv.to(tl.float32)).to(dt)
    return xv.to(tl.float32)


@triton.jit
def _scale_rms(y, rstd, NORM: tl.constexpr):
    """NORM == 2: the RMSNorm weight is folded into W, so norm(x) W^T = rstd * (x W^T)."""
    if NORM == 2:
        y = y * rstd
    return y


@triton.jit
def _wait(PDL: tl.constexpr):
    """With programmatic dependent launch, block until the previous kernel's writes are visible:
    nothing that kernel writes (our inputs) may be read, and nothing it reads may be written, before."""
    if PDL:
        tl.extra.cuda.gdc_wait()


# Each _rows_* returns the (BLOCK_N,) float32 products of its rows with the (prologue'd) input. The
# loops are software-pipelined by hand: the next weight tile is loaded before the current one is
# used, and the first tile is loaded before waiting on the previous kernel (weights never depend on
# it), so with PDL the weight stream starts while the previous kernel drains.

@triton.jit
def _rows_float(x_ptr, g_ptr, eps, w_ptr, rows64, rmask, K,
                NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    ki = tl.arange(0, BLOCK_K)
    base = w_ptr + rows64[:, None] * K + ki[None, :]
    if EVEN_K:
        w_next = tl.load(base, mask=rmask[:, None], other=0.0)
    else:
        w_next = tl.load(base, mask=rmask[:, None] & (ki < K)[None, :], other=0.0)
    _wait(PDL)
    rstd = _rstd(x_ptr, K, eps, NORM, NORM_BLOCK)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_next
        kn = k0 + BLOCK_K + ki
        w_next = tl.load(base + k0 + BLOCK_K, mask=rmask[:, None] & (kn < K)[None, :], other=0.0)
        kk = k0 + ki
        xv = _load_x(x_ptr, g_ptr, kk, kk < K, rstd, NORM)
        acc += w.to(tl.float32) * xv[None, :]
    return _scale_rms(tl.sum(acc, 1), rstd, NORM)


@triton.jit
def _unpack(src, P: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """The unsigned field of width BITS at bit P of int32 `src` (P + BITS <= 23), as a float, exactly
    and without a shift or an integer-to-float conversion (a slow instruction): OR the masked bits
    into the mantissa of 2**(23 - P), whose mantissa unit is 2**-P, and subtract 2**(23 - P). With ASM
    the mask-and-or is one PTX lop3 (the compiler otherwise emits two instructions)."""
    mask: tl.constexpr = ((1 << BITS) - 1) << P
    magic: tl.constexpr = (150 - P) << 23  # the bits of the float 2**(23 - P)
    if ASM:
        bits = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [src, tl.full(src.shape, mask, tl.int32), tl.full(src.shape, magic, tl.int32)],
            dtype=tl.int32, is_pure=True, pack=1,
        )
    else:
        bits = (src & mask) | magic
    return bits.to(tl.float32, bitcast=True) - (1 << (23 - P))


@triton.jit
def _int8_step(x_ptr, g_ptr, s_ptr, m_ptr, words, b0, bi, wi, rows64, rmask, K, KB, rstd,
               NORM: tl.constexpr, ASM: tl.constexpr, NB: tl.constexpr, WB: tl.constexpr, GROUP: tl.constexpr,
               PER_ROW: tl.constexpr, MINS: tl.constexpr):
    """One tile of NB blocks from block b0: (this tile's share of acc, of the input sums xb)."""
    b = b0 + bi
    bmask = b < KB
    words = words ^ -2139062144  # 0x80808080: q + 128 in every byte
    high = words >> 16
    dq = tl.zeros(words.shape, tl.float32)
    xs = tl.zeros([1, NB, WB], tl.float32)
    for j in tl.static_range(4):
        idx = b[:, None] * GROUP + j * WB + wi[None, :]
        xv = _load_x(x_ptr, g_ptr, idx, bmask[:, None], rstd, NORM)[None, :, :]
        # Byte j sits at bit 8*(j % 2) of `words` (j < 2) or of `high`.
        dq += _unpack(words if j < 2 else high, 8 * (j % 2), 8, ASM) * xv
        xs += xv
    if PER_ROW:
        part = dq
    else:
        soff = rows64[:, None] * KB + b[None, :]
        smask = rmask[:, None] & bmask[None, :]
        s = tl.load(s_ptr + soff, mask=smask, other=0.0)
        part = (dq - 128.0 * xs) * s.to(tl.float32)[:, :, None]
        if MINS:
            m = tl.load(m_ptr + soff, mask=smask, other=0.0)
            part += m.to(tl.float32)[:, :, None] * xs
    return part, xs


@triton.jit
def _rows_int8(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KB,
               NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr,
               MINS: tl.constexpr, STAGES: tl.constexpr):
    # KW words and KB blocks of GROUP inputs per row. In each block, byte j of word w is input
    # j*GROUP/4 + w (formats.py). Bytes are read biased (q + 128, by flipping their top bits) so that
    # they unpack as unsigned fields; the bias comes off as 128 * sum(x). The input slices are only
    # ever used broadcast over rows ([1, NB, WB]), which keeps every tile in one register layout.
    # MINS (int8_asym, grouped only): each block also adds m * sum(x).
    # STAGES == 1: the next tile is loaded by hand before the current one is used (in registers);
    # STAGES > 1: plain loads that Triton's pipeliner keeps STAGES tiles ahead (asynchronous copies
    # into shared memory, so more bytes are in flight per program than registers allow).
    NB: tl.constexpr = BLOCK_K // GROUP
    WB: tl.constexpr = GROUP // 4  # words per block
    bi = tl.arange(0, NB)
    wi = tl.arange(0, WB)
    base = w_ptr + rows64[:, None, None] * KW + (bi[:, None] * WB + wi[None, :])[None, :, :]
    acc = tl.zeros([BLOCK_N, NB, WB], tl.float32)
    xb = tl.zeros([1, NB, WB], tl.float32)
    if STAGES == 1:
        words_next = tl.load(base, mask=rmask[:, None, None] & (bi < KB)[None, :, None], other=0)
        _wait(PDL)
        rstd = _rstd(x_ptr, K, eps, NORM, NORM_BLOCK)
        for b0 in range(0, KB, NB):
            words = words_next
            words_next = tl.load(base + (b0 + NB) * WB,
                                 mask=rmask[:, None, None] & (b0 + NB + bi < KB)[None, :, None], other=0)
            part, xs = _int8_step(x_ptr, g_ptr, s_ptr, m_ptr, words, b0, bi, wi, rows64, rmask, K, KB, rstd,
                                  NORM, ASM, NB, WB, GROUP, PER_ROW, MINS)
            acc += part
            xb += xs
    else:
        _wait(PDL)
        rstd = _rstd(x_ptr, K, eps, NORM, NORM_BLOCK)
        for b0 in tl.range(0, KB, NB, num_stages=STAGES):
            words = tl.load(base + b0 * WB, mask=rmask[:, None, None] & (b0 + bi < KB)[None, :, None], other=0)
            part, xs = _int8_step(x_ptr, g_ptr, s_ptr, m_ptr, words, b0, bi, wi, rows64, rmask, K, KB, rstd,
                                  NORM, ASM, NB, WB, GROUP, PER_ROW, MINS)
            acc += part
            xb += xs
    if PER_ROW:
        s = tl.load(s_ptr + rows64, mask=rmask, other=0.0).to(tl.float32)
        y = tl.sum(tl.sum(acc - 128.0 * xb, 2), 1) * s
    else:
        y = tl.sum(tl.sum(acc, 2), 1)
    return _scale_rms(y, rstd, NORM)


@triton.jit
def _int4_step(x_ptr, g_ptr, s_ptr, m_ptr, words, g0, gi, wi, rows64, rmask, K, KG, rstd,
               NORM: tl.constexpr, ASM: tl.constexpr, NG: tl.constexpr, WS: tl.constexpr, GROUP: tl.constexpr):
    """One tile of NG groups from group g0: its share of the accumulator."""
    g = g0 + gi
    gmask = g < KG
    high = words >> 12  # nibbles 5..7 down to bits 8..19
    dq = tl.zeros(words.shape, tl.float32)
    xs = tl.zeros([1, NG, WS], tl.float32)
    for i in tl.static_range(8):
        # Nibble i of word w in group g is input g*GROUP + i*WS + w (formats.py).
        idx = g[:, None] * GROUP + i * WS + wi[None, :]
        xv = _load_x(x_ptr, g_ptr, idx, gmask[:, None], rstd, NORM)[None, :, :]
        # Nibble i sits at bit 4i of `words` (i < 5) or 4i - 12 of `high`.
        dq += _unpack(words if i < 5 else high, 4 * i - 12 * (i >= 5), 4, ASM) * xv
        xs += xv
    soff = rows64[:, None] * KG + g[None, :]
    smask = rmask[:, None] & gmask[None, :]
    s = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + soff, mask=smask, other=0.0).to(tl.float32)
    # sum_k (q s + m) x = s * sum(q x) + m * sum(x), per group.
    return dq * s[:, :, None] + m[:, :, None] * xs


@triton.jit
def _rows_int4(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KG,
               NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr):
    # KW words and KG groups per row; the input slices are only used broadcast over rows (see int8,
    # also for STAGES).
    NG: tl.constexpr = BLOCK_K // GROUP
    WS: tl.constexpr = GROUP // 8  # words per group
    gi = tl.arange(0, NG)
    wi = tl.arange(0, WS)
    base = w_ptr + rows64[:, None, None] * KW + (gi[:, None] * WS + wi[None, :])[None, :, :]
    acc = tl.zeros([BLOCK_N, NG, WS], tl.float32)
    if STAGES == 1:
        words_next = tl.load(base, mask=rmask[:, None, None] & (gi < KG)[None, :, None], other=0)
        _wait(PDL)
        rstd = _rstd(x_ptr, K, eps, NORM, NORM_BLOCK)
        for g0 in range(0, KG, NG):
            words = words_next
            words_next = tl.load(base + (g0 + NG) * WS,
                                 mask=rmask[:, None, None] & (g0 + NG + gi < KG)[None, :, None], other=0)
            acc += _int4_step(x_ptr, g_ptr, s_ptr, m_ptr, words, g0, gi, wi, rows64, rmask, K, KG, rstd,
                              NORM, ASM, NG, WS, GROUP)
    else:
        _wait(PDL)
        rstd = _rstd(x_ptr, K, eps, NORM, NORM_BLOCK)
        for g0 in tl.range(0, KG, NG, num_stages=STAGES):
            words = tl.load(base + g0 * WS, mask=rmask[:, None, None] & (g0 + gi < KG)[None, :, None], other=0)
            acc += _int4_step(x_ptr, g_ptr, s_ptr, m_ptr, words, g0, gi, wi, rows64, rmask, K, KG, rstd,
                              NORM, ASM, NG, WS, GROUP)
    return _scale_rms(tl.sum(tl.sum(acc, 2), 1), rstd, NORM)


# Variants of the int4 loop (GemvConfig.variant), both on a [BLOCK_N, NG, WS // V, V] tile with V = 4
# words, the 16 bytes a thread loads with one instruction, so that the compiler keeps the last axis
# inside a thread:
# 1: today's float32 math, but the products of a thread's V words are summed in registers before the
#    group's scale and minimum are applied (the loop above applies them to every word of every row),
#    and the accumulator holds one value per group slice instead of one per word. Same products,
#    summed in another order.
# 2: packed half-precision math: one lop3 turns two nibbles of a word into a float16 pair, and every
#    later operation on a pair is one instruction (HFMA2): per weight about 1.7 instructions where
#    the float32 unpack, subtract and FMA alone take 3. Each q s is rounded to float16 (from the
#    float16 s: one rounding, exact up to it) and multiplied by x rounded to float16 (exact for
#    bfloat16 x of magnitude 6e-5 .. 65504); the 16 products of a thread's 4 words are summed per
#    half in float16, then in float32, which also adds the minimums' m * sum(x). The product sums come
#    out about 2e-3 off in relative terms (1e-7 for variants 0 and 1), the size of the bfloat16
#    rounding of the dequantized weight that bfloat16 models are checked against (1.5e-3 .. 1.8e-3 on
#    random 7B-like rows in the CPU emulation). The PTX runs on CUDA GPUs; the CPU
#    interpreter runs the same roundings written in float32 (_dot4_f16x2_emulated).


@triton.jit
def _x_half_pair(lo, hi):
    """float32 lo, hi -> one int32 holding the float16 pair (lo in the low half): cvt.rn.f16x2."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _x_pair(x_ptr, g_ptr, idx, xmask, rstd, j: tl.constexpr, NORM: tl.constexpr, WS: tl.constexpr):
    """(the inputs of nibbles j and j + 4 of the words at idx as float16 pairs, divided by 16 for odd j
    (see _dot4_f16x2_asm), [1, ...] for broadcast; their float32 sum)."""
    lo = _load_x(x_ptr, g_ptr, idx + j * WS, xmask, rstd, NORM)
    hi = _load_x(x_ptr, g_ptr, idx + (j + 4) * WS, xmask, rstd, NORM)
    f = 1.0 / 16 if j % 2 else 1.0
    return _x_half_pair(lo * f, hi * f)[None, :, :, :], lo + hi


def _dot4_f16x2_asm() -> str:
    """PTX of _dot4_f16x2: four words' 8 nibbles each times their inputs, in float16 pairs, summed into
    one float16 pair and then one float32. A lop3 with the magic 0x6400 (1024.0) puts nibbles (i, i + 4)
    in the halves of one register: 1024 + q for i = 0, 2 (after a shift by 8), 1024 + 16 q for i = 1, 3.
    One FMA with s and c = -1024 s then gives q s or 16 q s exactly before its one rounding (1024 s is
    exact in float16); the 16 is taken off by the caller's inputs x / 16 (exact).
    Operands: $0 the result, $1..$4 the words, $5.. four input pairs per word, $21 s, $22 c pairs."""
    lines = ["{", ".reg .b32 a, b, c, d, t, k, acc;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;",
             "mov.b32 k, 0x64006400;"]
    for v in range(4):
        w, x = f"${1 + v}", [f"${5 + 4 * v + j}" for j in range(4)]
        lines += [f"lop3.b32 a, {w}, 0x000F000F, k, 0xEA;", f"lop3.b32 b, {w}, 0x00F000F0, k, 0xEA;",
                  f"shr.b32 t, {w}, 8;", "lop3.b32 c, t, 0x000F000F, k, 0xEA;", "lop3.b32 d, t, 0x00F000F0, k, 0xEA;"]
        lines += [f"fma.rn.f16x2 {r}, {r}, $21, $22;" for r in "abcd"]  # q s (a, c) or 16 q s (b, d)
        lines += [f"mul.rn.f16x2 acc, a, {x[0]};" if v == 0 else f"fma.rn.f16x2 acc, a, {x[0]}, acc;"]
        lines += [f"fma.rn.f16x2 acc, {r}, {x[j]}, acc;" for j, r in ((1, "b"), (2, "c"), (3, "d"))]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}"]
    return "\n".join(lines)


_DOT4_F16X2 = tl.constexpr(_dot4_f16x2_asm())


@triton.jit
def _dot4_f16x2(w, x0, x1, x2, x3, s2, c2):
    """sum over the last axis (V = 4 words) of each word's nibbles times their inputs (xj: the float16
    pairs of nibbles j and j + 4), q s rounded to float16: the V axis is split into four tensors, one
    asm operand each."""
    w0, w1, w2, w3 = _quarters(w)
    a0, a1, a2, a3 = _quarters(x0)
    b0, b1, b2, b3 = _quarters(x1)
    c0, c1, c2_, c3 = _quarters(x2)
    d0, d1, d2, d3 = _quarters(x3)
    return tl.inline_asm_elementwise(
        _DOT4_F16X2, "=f" + ",r" * 22,
        [w0, w1, w2, w3, a0, b0, c0, d0, a1, b1, c1, d1, a2, b2, c2_, d2, a3, b3, c3, d3, s2, c2],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _quarters(t):
    """The four slices t[..., 0..3] of a 4-d tensor whose last axis (4, in one thread's registers) is
    split in place: (reshape to [..., 2, 2], then split twice; the order does not matter to a sum)."""
    lo, hi = tl.split(tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2], 2, 2]))
    a, b = tl.split(lo)
    c, d = tl.split(hi)
    return a, b, c, d


@triton.jit
def _f16(v):
    return v.to(tl.float16).to(tl.float32)


@triton.jit
def _pick(t, vi, v: tl.constexpr):
    """t[..., v] of a 4-d tensor (exactly: one term and zeros)."""
    return tl.sum(tl.where(vi[None, None, None, :] == v, t, 0.0), 3)


@triton.jit
def _dot4_f16x2_emulated(words, x_ptr, g_ptr, idx, xmask, rstd, s16, vi, NORM: tl.constexpr, WS: tl.constexpr):
    """_dot4_f16x2's roundings in float32 (the CPU interpreter runs no PTX), in its order: per half
    (nibbles 0..3 low, 4..7 high), word by word, nibble by nibble."""
    high = words >> 12
    lo = tl.zeros([words.shape[0], words.shape[1], words.shape[2]], tl.float32)
    hi = tl.zeros([words.shape[0], words.shape[1], words.shape[2]], tl.float32)
    for v in tl.static_range(4):
        for j in tl.static_range(4):
            for half in tl.static_range(2):
                i: tl.constexpr = j + 4 * half
                f: tl.constexpr = 16.0 if j % 2 else 1.0
                q = _unpack(words if i < 5 else high, 4 * i - 12 * (i >= 5), 4, False)
                qs = _pick(_f16(q * f * s16), vi, v)
                xv = _pick(_f16(_load_x(x_ptr, g_ptr, idx + i * WS, xmask, rstd, NORM)[None, :, :, :] / f), vi, v)
                if half == 0:
                    lo = _f16(lo + qs * xv)
                else:
                    hi = _f16(hi + qs * xv)
    return lo + hi


@triton.jit
def _int4_step_vec(x_ptr, g_ptr, s_ptr, m_ptr, words, g0, gi, ci, vi, rows64, rmask, K, KG, rstd,
                   NORM: tl.constexpr, ASM: tl.constexpr, NG: tl.constexpr, WS: tl.constexpr,
                   GROUP: tl.constexpr, V: tl.constexpr, VARIANT: tl.constexpr):
    """One [BLOCK_N, NG, WS // V, V] tile of words from group g0: its [BLOCK_N, NG, WS // V] share."""
    g = g0 + gi
    gmask = g < KG
    wi = ci[:, None] * V + vi[None, :]  # (WS // V, V): the word within its group
    idx = g[:, None, None] * GROUP + wi[None, :, :]  # nibble i of the word: input idx + i * WS
    xmask = gmask[:, None, None]
    soff = rows64[:, None] * KG + g[None, :]
    smask = rmask[:, None] & gmask[None, :]
    s = tl.load(s_ptr + soff, mask=smask, other=0.0)[:, :, None].to(tl.float32)  # [BLOCK_N, NG, 1]
    m = tl.load(m_ptr + soff, mask=smask, other=0.0)[:, :, None].to(tl.float32)
    if VARIANT == 1:
        high = words >> 12
        dq = tl.zeros(words.shape, tl.float32)
        xs = tl.zeros([1, NG, WS // V, V], tl.float32)
        for i in tl.static_range(8):
            xv = _load_x(x_ptr, g_ptr, idx + i * WS, xmask, rstd, NORM)[None, :, :, :]
            dq += _unpack(words if i < 5 else high, 4 * i - 12 * (i >= 5), 4, ASM) * xv
            xs += xv
        part = tl.sum(dq, 3) * s + m * tl.sum(xs, 3)
    else:
        s16 = _f16(s)  # s as float16 has it, so that -1024 s below is exact
        if ASM:
            x0, t0 = _x_pair(x_ptr, g_ptr, idx, xmask, rstd, 0, NORM, WS)
            x1, t1 = _x_pair(x_ptr, g_ptr, idx, xmask, rstd, 1, NORM, WS)
            x2, t2 = _x_pair(x_ptr, g_ptr, idx, xmask, rstd, 2, NORM, WS)
            x3, t3 = _x_pair(x_ptr, g_ptr, idx, xmask, rstd, 3, NORM, WS)
            xs = (t0 + t1) + (t2 + t3)
            dot = _dot4_f16x2(words, x0, x1, x2, x3, _x_half_pair(s16, s16), _x_half_pair(-1024.0 * s16, -1024.0 * s16))
        else:
            xs = tl.zeros([NG, WS // V, V], tl.float32)
            for i in tl.static_range(8):
                xs += _load_x(x_ptr, g_ptr, idx + i * WS, xmask, rstd, NORM)
            dot = _dot4_f16x2_emulated(words, x_ptr, g_ptr, idx, xmask, rstd, s16[:, :, :, None], vi, NORM, WS)
        part = dot + m * tl.sum(xs[None, :, :, :], 3)
    return part


@triton.jit
def _rows_int4_vec(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KG,
                   NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
                   VARIANT: tl.constexpr):
    NG: tl.constexpr = BLOCK_K // GROUP
    WS: tl.constexpr = GROUP // 8
    V: tl.constexpr = 4
    gi = tl.arange(0, NG)
    ci = tl.arange(0, WS // V)
    vi = tl.arange(0, V)
    wofs = (gi[:, None, None] * WS + ci[None, :, None] * V + vi[None, None, :])[None, :, :, :]
    base = w_ptr + rows64[:, None, None, None] * KW + wofs
    rm = rmask[:, None, None, None]
    acc = tl.zeros([BLOCK_N, NG, WS // V], tl.float32)
    if STAGES == 1:
        # No `other`: masked words are left as they are, which is harmless (any bits unpack to a finite
        # q in 0..15, and their scale, minimum and input are 0), and saves zeroing 16 bytes a load.
        words_next = tl.load(base, mask=rm & (gi < KG)[None, :, None, None])
        _wait(PDL)
        rstd = _rstd(x_ptr, K, eps, NORM, NORM_BLOCK)
        for g0 in range(0, KG, NG):
            words = words_next
            words_next = tl.load(base + (g0 + NG) * WS, mask=rm & (g0 + NG + gi < KG)[None, :, None, None])
            acc += _int4_step_vec(x_ptr, g_ptr, s_ptr, m_ptr, words, g0, gi, ci, vi, rows64, rmask, K, KG, rstd,
                                  NORM, ASM, NG, WS, GROUP, V, VARIANT)
    else:
        _wait(PDL)
        rstd = _rstd(x_ptr, K, eps, NORM, NORM_BLOCK)
        for g0 in tl.range(0, KG, NG, num_stages=STAGES):
            words = tl.load(base + g0 * WS, mask=rm & (g0 + gi < KG)[None, :, None, None])
            acc += _int4_step_vec(x_ptr, g_ptr, s_ptr, m_ptr, words, g0, gi, ci, vi, rows64, rmask, K, KG, rstd,
                                  NORM, ASM, NG, WS, GROUP, V, VARIANT)
    return _scale_rms(tl.sum(tl.sum(acc, 2), 1), rstd, NORM)


@triton.jit
def _rows(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KB,
          FMT: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, NORM: tl.constexpr,
          NORM_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, VARIANT: tl.constexpr):
    if FMT == 0:
        y = _rows_float(x_ptr, g_ptr, eps, w_ptr, rows64, rmask, K, NORM, NORM_BLOCK, EVEN_K, PDL, BLOCK_N, BLOCK_K)
    elif FMT == 1 or FMT == 3:
        y = _rows_int8(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KB, NORM, NORM_BLOCK, PDL, ASM,
                       BLOCK_N, BLOCK_K, GROUP, PER_ROW, FMT == 3, STAGES)
    elif VARIANT:
        y = _rows_int4_vec(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KB, NORM, NORM_BLOCK, PDL,
                           ASM, BLOCK_N, BLOCK_K, GROUP, STAGES, VARIANT)
    else:
        y = _rows_int4(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KB, NORM, NORM_BLOCK, PDL, ASM,
                       BLOCK_N, BLOCK_K, GROUP, STAGES)
    return y


@triton.jit
def _gemv_kernel(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, r_ptr, y_ptr,
                 N, K, KW, KB, ROWS2, eps, res_scale,
                 FMT: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, NORM: tl.constexpr,
                 SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
                 ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr,
                 STAGES: tl.constexpr, VARIANT: tl.constexpr):
    """Rows [pid*BLOCK_N, ...) of y = epilogue(W prologue(x)); x (K,), y (N,)."""
    if PDL:  # let the next kernel's programs get ready as soon as all of ours have started
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    dt = x_ptr.dtype.element_ty
    y = _rows(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64, rmask, K, KW, KB,
              FMT, GROUP, PER_ROW, NORM, NORM_BLOCK, EVEN_K, PDL, ASM, BLOCK_N, BLOCK_K, STAGES, VARIANT).to(dt)
    if SWIGLU:
        up = _rows(x_ptr, g_ptr, eps, w_ptr, s_ptr, m_ptr, rows64 + ROWS2, rmask, K, KW, KB,
                   FMT, GROUP, PER_ROW, NORM, NORM_BLOCK, EVEN_K, PDL, ASM, BLOCK_N, BLOCK_K, STAGES, VARIANT).to(dt)
        a = y.to(tl.float32)
        y = (a / (1.0 + tl.exp(-a))).to(dt)  # silu, as PyTorch computes it
        y = (y.to(tl.float32) * up.to(tl.float32)).to(dt)
    if RESIDUAL:
        r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
        y = (y.to(tl.float32) * res_scale).to(dt)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(dt)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


@dataclass(frozen=True)
class GemvConfig:
    """A tile: block_n output rows per program, block_k inputs per loop step, warps per program."""

    block_n: int
    block_k: int  # inputs per loop step (a multiple of the group for grouped formats)
    num_warps: int = 4
    num_stages: int = 1
    # int4 only: 0 the per-word loop (_rows_int4), 1 or 2 the vector-tile loops (_rows_int4_vec).
    variant: int = 0


# Tile shapes measured best on the H100 (`python -m torchchat.kernels.tune`) per format, per size class of
# the layer's outputs: "fmt:small" (<= SMALL_ROWS), "fmt:large" (> LARGE_ROWS), else "fmt". Other GPUs
# can override them: TORCHCHAT_GEMV_TILES='{"int4": [block_n, block_k, num_warps(, num_stages(, variant))], ...}'.
SMALL_ROWS, LARGE_ROWS = 8192, 12288
_CONFIGS = {
    "float": GemvConfig(block_n=2, block_k=2048, num_warps=4),
    "float:small": GemvConfig(block_n=2, block_k=2048, num_warps=8),
    # int8: eight rows, three tiles in flight through Triton's pipeliner (2026-12-06 sweep: 2.41 TB/s
    # over the 7B shapes against 2.24 for the best hand-prefetched tile; a 7B step 4.17 -> 3.54 ms).
    "int8": GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=3),
    "int8:small": GemvConfig(block_n=8, block_k=1024, num_warps=4, num_stages=3),
    "int4": GemvConfig(block_n=32, block_k=512, num_warps=4),
    "int4:small": GemvConfig(block_n=16, block_k=1024, num_warps=8),
    "int4:large": GemvConfig(block_n=64, block_k=512, num_warps=4),
}


@functools.lru_cache(maxsize=None)
def _tiles(text: str) -> dict[str, GemvConfig]:
    tiles = dict(_CONFIGS)
    if text:
        for key, fields in json.loads(text).items():  # [block_n, block_k, num_warps(, num_stages(, variant))]
            tiles[key] = GemvConfig(*fields)
    return tiles


def pick_config(fmt: str, n: int, k: int, block: int) -> GemvConfig:
    """The tile for n outputs of k inputs: the measured best for the format and size class, shrunk
    for small matrices. `block`: the packing block of integer formats, which a tile step must be a
    multiple of."""
    tiles = _tiles(os.environ.get("TORCHCHAT_GEMV_TILES", ""))
    size = "small" if n <= SMALL_ROWS else "large" if n > LARGE_ROWS else ""
    kind = "int8" if fmt == "int8_asym" else fmt  # one more load per group: int8's tiles
    base = tiles.get(f"{kind}:{size}", tiles[kind])
    block_k = min(base.block_k, triton.next_power_of_2(k))
    if fmt != "float":
        block_k = max(block_k, block)
    block_n = min(base.block_n, triton.next_power_of_2(n))
    return GemvConfig(block_n, block_k, base.num_warps, base.num_stages, base.variant)


def kernel_constexprs(cfg: GemvConfig) -> dict:
    """The tile's compile-time arguments of _gemv_kernel (also what bench/gemv_sm90_report.py compiles)."""
    return dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages, VARIANT=cfg.variant)


def gemv(x: Tensor, fmt: str, groupsize: int, weight: Tensor, scales: Tensor | None = None,
         mins: Tensor | None = None, *, norm_weight: Tensor | None = None, eps: float = 0.0,
         rms_only: bool = False, swiglu: bool = False, residual: Tensor | None = None,
         res_scale: float = 1.0, out_dtype: torch.dtype | None = None, config: GemvConfig | None = None) -> Tensor:
    """y = epilogue(W @ prologue(x)) for one input row.

    x: (K,) contiguous, the model dtype. weight/scales/mins: a stored format (formats.py) of an
    (N_w, K) matrix; with `swiglu`, N_w = 2 N (w1 rows, then w3 rows). norm_weight: (K,) RMSNorm
    weight applied to x first; rms_only: RMSNorm whose weight is already folded into W (the product
    is scaled by 1/rms(x)). residual: (N,) added (after scaling the product by res_scale).
    Returns (N,) in `out_dtype` (default x's dtype); values are rounded to x's dtype either way."""
    k = x.numel()
    n_w = weight.shape[0]
    n = n_w // 2 if swiglu else n_w
    block = pack_block(fmt, groupsize) if fmt != "float" else 0
    cfg = config or pick_config(fmt, n, k, block)
    out = torch.empty(n, dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n),)
    use_pdl = pdl_enabled(x)
    _gemv_kernel[grid](
        x, norm_weight if norm_weight is not None else x, weight,
        scales if scales is not None else x, mins if mins is not None else x,
        residual if residual is not None else x, out,
        n, k, weight.shape[1], k // block if block else 1, n, eps, res_scale,
        FMT=_FMT_CODE[fmt], GROUP=block, PER_ROW=fmt == "int8" and groupsize == 0,
        NORM=2 if rms_only else int(norm_weight is not None), SWIGLU=swiglu, RESIDUAL=residual is not None,
        EVEN_K=k % cfg.block_k == 0, PDL=use_pdl, ASM=x.is_cuda,
        NORM_BLOCK=min(8192, triton.next_power_of_2(k)), **kernel_constexprs(cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl,
    )
    return out
