"""Products of a few input rows with one integer-format weight on the CUDA cores (no tensor cores):
Y = epilogue(prologue(X) W^T), X (M, K), for the small-batch decode of int4 and int8 weights.

Why a second kernel beside gemv_rows.py's: there tl.dot needs each dequantized tile in its operand
layout, which for int4 (eight nibble fields per word, each a separate dot) goes through shared
memory every field of every step; on the H100 that held the 8-row int4 step to ~220 GB/s of weights.
Here a program loads a weight tile once, unpacks it as gemv.py does (`_unpack`), dequantizes it in
float32 registers and multiplies it into every input row with plain FMAs: the accumulator is one
(BLOCK_M, BLOCK_N, blocks, words) float32 block, the input rows broadcast over the weight rows and
the weight over the input rows, summed once at the end. Each dequantized weight is reused BLOCK_M
times from registers, and per field only the input slice changes layout (see _few_int8).

BLOCK_M is M rounded up to a power of two (at most 16; more rows take a second grid axis, each block
of rows reading the weights again), so one compiled kernel serves each class of M.

Roundings: the weights are dequantized in float32 and not rounded to the model dtype, unrounded as
in gemv.py's one-row kernel (which factors each group's scale out of its sum) and cheaper by two
conversions per weight; the tensor-core kernel must round each weight to the model dtype first,
as formats.dequantize does, so the results differ from gemv_rows' dot kernel by that one
rounding of each weight, well inside a bf16 rounding of the sums; per-channel int8 multiplies the
integers and scales the float32 sums by the row's scale, as both other kernels do. Products
accumulate in float32. The prologue (NORM 1: RMSNorm rounded as the module; NORM 2: the norm
weight folded into W, the sums scaled by 1/rms) and the epilogues (swiglu, residual, res_scale,
out_dtype) are gemv_rows.py's own helpers.

Which kernel serves which (format, M) is chosen in gemv_rows.py (`rows_kernel`). Import only on CUDA
machines (or with TRITON_INTERPRET=1 for the CPU tests): this module imports triton.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchchat.kernels.formats import pack_block
from torchchat.kernels.gemv import _FMT_CODE, GemvConfig, _unpack, _wait, pdl_enabled
from torchchat.kernels.gemv_rows import _load_xm, _rstd_rows, _store_rows

FORMATS = ("int8", "int8_asym", "int4")  # the float format has nothing to unpack: gemv_rows' dot serves it
MAX_BLOCK_M = 16


class FewRowsError(ValueError):
    """A format or tile the CUDA-core few-rows kernel does not take."""


@triton.jit
def _few_int8(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, K, KW, KB, eps,
              NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
              GROUP: tl.constexpr, PER_ROW: tl.constexpr, MINS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Layout as in gemv._rows_int8: in each block of GROUP inputs byte j of word w is input
    # j*GROUP/4 + w, read biased by 128 (the bias comes off before the product here).
    # Every tile is 4-D from its load on, (input rows, weight rows, blocks, words): weights
    # (1, BLOCK_N, NB, WB), their scales (1, BLOCK_N, NB, 1), inputs (BLOCK_M, 1, NB, WB), so that the
    # products are plain broadcasts and a scale is read once per block. The compiler keeps the
    # accumulator in the layout of the load issued last in the loop body and converts the other
    # operand (through shared memory) every field: the next weight tile is therefore loaded at the
    # end of the body, not at its start as in gemv.py, which makes the input slice the one converted
    # (smaller than the weight tile while BLOCK_M <= BLOCK_N; seen in the sm_90 TTGIR). A load of
    # fewer elements than the program has threads is no layout anchor, so with BLOCK_M * L < 32 *
    # num_warps the inputs are loaded straight in the accumulator's layout, no conversion at all;
    # such tiles hold fewer weight rows per thread, though, and reload each input more often (int4,
    # 8 rows: 64x128w8 counts ~300 SASS instructions per word against 16x512w4's ~160).
    NB: tl.constexpr = BLOCK_K // GROUP
    WB: tl.constexpr = GROUP // 4
    bi = tl.arange(0, NB)[None, None, :, None]
    wi = tl.arange(0, WB)[None, None, None, :]
    r4 = rows64[None, :, None, None]
    rm4 = rmask[None, :, None, None]
    base = w_ptr + r4 * KW + bi * WB + wi
    # The first tile before waiting on the previous kernel: weights never depend on it (gemv.py).
    words_next = tl.load(base, mask=rm4 & (bi < KB), other=0)
    _wait(PDL)
    rstd = _rstd_rows(x_ptr, m64, mmask, K, eps, NORM, NORM_BLOCK, BLOCK_M)[:, None, None, None]
    xrow = m64[:, None, None, None] * K
    xmask = mmask[:, None, None, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N, NB, WB], tl.float32)
    for b0 in range(0, KB, NB):
        words = words_next ^ -2139062144  # 0x80808080: q + 128 in every byte
        b = b0 + bi
        bmask = b < KB
        high = words >> 16
        if not PER_ROW:
            soff = r4 * KB + b
            s = tl.load(s_ptr + soff, mask=rm4 & bmask, other=0.0).to(tl.float32)
            if MINS:
                mn = tl.load(m_ptr + soff, mask=rm4 & bmask, other=0.0).to(tl.float32)
        for j in tl.static_range(4):
            q = _unpack(words if j < 2 else high, 8 * (j % 2), 8, ASM) - 128.0
            if PER_ROW:
                w = q  # the row's scale multiplies the sums below
            elif MINS:
                w = q * s + mn
            else:
                w = q * s
            idx = b * GROUP + j * WB + wi
            xv = _load_xm(x_ptr, g_ptr, xrow + idx, idx, xmask & bmask, rstd, NORM)
            acc += w * xv.to(tl.float32)  # (1, BLOCK_N, NB, WB) x (BLOCK_M, 1, NB, WB)
        words_next = tl.load(base + (b0 + NB) * WB, mask=rm4 & (b0 + NB + bi < KB), other=0)
    y = tl.sum(tl.sum(acc, 3), 2)
    if PER_ROW:
        s_row = tl.load(s_ptr + rows64, mask=rmask, other=0.0).to(tl.float32)
        y = y * s_row[None, :]
    if NORM == 2:  # the norm weight is folded into W: norm(x) W^T = rstd * (x W^T)
        y = y * tl.reshape(rstd, [BLOCK_M, 1])
    return y


@triton.jit
def _few_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, K, KW, KG, eps,
              NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
              GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Layout as in gemv._rows_int4: nibble i of word w in group g is input g*GROUP + i*GROUP/8 + w.
    # 4-D tiles (input rows, weight rows, groups, words), the next weight tile loaded last in the
    # body: see _few_int8 why.
    NG: tl.constexpr = BLOCK_K // GROUP
    WS: tl.constexpr = GROUP // 8
    gi = tl.arange(0, NG)[None, None, :, None]
    wi = tl.arange(0, WS)[None, None, None, :]
    r4 = rows64[None, :, None, None]
    rm4 = rmask[None, :, None, None]
    base = w_ptr + r4 * KW + gi * WS + wi
    words_next = tl.load(base, mask=rm4 & (gi < KG), other=0)
    _wait(PDL)
    rstd = _rstd_rows(x_ptr, m64, mmask, K, eps, NORM, NORM_BLOCK, BLOCK_M)[:, None, None, None]
    xrow = m64[:, None, None, None] * K
    xmask = mmask[:, None, None, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N, NG, WS], tl.float32)
    for g0 in range(0, KG, NG):
        words = words_next
        g = g0 + gi
        gmask = g < KG
        high = words >> 12  # nibbles 5..7 down to bits 8..19
        soff = r4 * KG + g
        s = tl.load(s_ptr + soff, mask=rm4 & gmask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + soff, mask=rm4 & gmask, other=0.0).to(tl.float32)
        for i in tl.static_range(8):
            q = _unpack(words if i < 5 else high, 4 * i - 12 * (i >= 5), 4, ASM)
            w = q * s + mn
            idx = g * GROUP + i * WS + wi
            xv = _load_xm(x_ptr, g_ptr, xrow + idx, idx, xmask & gmask, rstd, NORM)
            acc += w * xv.to(tl.float32)
        words_next = tl.load(base + (g0 + NG) * WS, mask=rm4 & (g0 + NG + gi < KG), other=0)
    y = tl.sum(tl.sum(acc, 3), 2)
    if NORM == 2:
        y = y * tl.reshape(rstd, [BLOCK_M, 1])
    return y


@triton.jit
def _few(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, K, KW, KB, eps,
         FMT: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, NORM: tl.constexpr,
         NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 products of the prologue'd input rows m64 with weight rows rows64."""
    if FMT == 2:
        y = _few_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, K, KW, KB, eps,
                      NORM, NORM_BLOCK, PDL, ASM, GROUP, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        y = _few_int8(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, K, KW, KB, eps,
                      NORM, NORM_BLOCK, PDL, ASM, GROUP, PER_ROW, FMT == 3, BLOCK_M, BLOCK_N, BLOCK_K)
    return y


# One compiled kernel per BLOCK_M class, not per M % 16; KB (blocks per row) only offsets the scales,
# read per column anyway, so w2's 86 blocks need no kernel of their own.
@triton.jit(do_not_specialize=["M", "KB"])
def _gemv_few_kernel(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, r_ptr, y_ptr,
                     M, N, K, KW, KB, ROWS2, eps, res_scale,
                     FMT: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, NORM: tl.constexpr,
                     SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     NORM_BLOCK: tl.constexpr):
    """Outputs [pid0*BLOCK_N, ...) of input rows [pid1*BLOCK_M, ...): X (M, K), Y (M, N)."""
    if PDL:  # let the next kernel's programs get ready as soon as all of ours have started
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    m64 = m.to(tl.int64)
    y = _few(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, K, KW, KB, eps,
             FMT, GROUP, PER_ROW, NORM, NORM_BLOCK, PDL, ASM, BLOCK_M, BLOCK_N, BLOCK_K)
    up = y
    if SWIGLU:
        up = _few(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64 + ROWS2, rmask, m64, mmask, K, KW, KB, eps,
                  FMT, GROUP, PER_ROW, NORM, NORM_BLOCK, PDL, ASM, BLOCK_M, BLOCK_N, BLOCK_K)
    _store_rows(y, up, x_ptr, r_ptr, y_ptr, m64, mmask, rows64, rmask, N, res_scale, SWIGLU, RESIDUAL)


# Tiles: (weight rows per program, inputs per step, warps), looked up as "fmt:BLOCK_M:swiglu" (the
# stacked w1|w3 product), then "fmt:BLOCK_M" (e.g. "int4:8": 5..8 rows), then "fmt". NOT MEASURED:
# guesses from compiling for sm_90 without a GPU (bench/few_rows_sm90_report.py): the accumulator
# is BLOCK_M * BLOCK_N * L float32 (L = BLOCK_K / 8 words for int4, / 4 for int8) over 32 * warps
# threads; these tiles stay at 65-170 registers a thread without spills. With swiglu two products
# run one after the other and take about 1.7x the registers (int4 8 rows 16x512w4: 255 and 44 bytes
# spilled), hence the halved tiles. bench/cuda_rows_bench.py sweeps candidates on a GPU and prints the best.
# Override with TORCHCHAT_GEMV_FEW_TILES='{"int4:8": [block_n, block_k, num_warps], "int4": [...], ...}'.
_CONFIGS = {
    # int4: the best of bench/cuda_rows_bench.py's sweep on the H100 (2026-12-06, 7B shapes).
    "int4": GemvConfig(block_n=32, block_k=512, num_warps=8),
    "int4:2": GemvConfig(block_n=16, block_k=1024, num_warps=8),
    "int4:2:swiglu": GemvConfig(block_n=8, block_k=1024, num_warps=8),
    "int4:4": GemvConfig(block_n=32, block_k=512, num_warps=8),
    "int4:4:swiglu": GemvConfig(block_n=16, block_k=512, num_warps=8),
    "int4:8": GemvConfig(block_n=32, block_k=512, num_warps=8),
    "int4:8:swiglu": GemvConfig(block_n=32, block_k=512, num_warps=8),
    "int4:16": GemvConfig(block_n=32, block_k=256, num_warps=8),
    "int4:16:swiglu": GemvConfig(block_n=32, block_k=256, num_warps=8),
    "int8": GemvConfig(block_n=32, block_k=256, num_warps=4),
    "int8:4": GemvConfig(block_n=16, block_k=256, num_warps=4),
    "int8:8": GemvConfig(block_n=16, block_k=256, num_warps=4),
    "int8:8:swiglu": GemvConfig(block_n=8, block_k=256, num_warps=4),
    "int8:16": GemvConfig(block_n=16, block_k=128, num_warps=4),
    "int8:16:swiglu": GemvConfig(block_n=8, block_k=128, num_warps=4),
}


def block_m(m: int) -> int:
    """Input rows per program for M rows: M rounded up to a power of two, at most MAX_BLOCK_M."""
    return min(MAX_BLOCK_M, triton.next_power_of_2(max(m, 1)))


def pick_few_config(fmt: str, m: int, n: int, k: int, block: int, swiglu: bool = False) -> GemvConfig:
    """The tile for m input rows, n outputs of k inputs (of each half with `swiglu`); `block`: the
    format's packing block, which a step must be a multiple of."""
    if fmt not in FORMATS:
        raise FewRowsError(f"the few-rows CUDA-core kernel takes {', '.join(FORMATS)}, not {fmt!r}")
    tiles = dict(_CONFIGS)
    text = os.environ.get("TORCHCHAT_GEMV_FEW_TILES", "")
    if text:
        for key, tile in json.loads(text).items():
            tiles[key] = GemvConfig(*tile)
    kind = "int8" if fmt == "int8_asym" else fmt  # one more load per group: int8's tiles
    key = f"{kind}:{block_m(m)}"
    base = tiles.get(f"{key}:swiglu" if swiglu else key) or tiles.get(key) or tiles[kind]
    block_k = max(min(base.block_k, triton.next_power_of_2(k)), block)
    block_n = min(base.block_n, triton.next_power_of_2(n))
    return GemvConfig(block_n, block_k, base.num_warps, base.num_stages)


def gemv_few(x: Tensor, fmt: str, groupsize: int, weight: Tensor, scales: Tensor | None = None,
             mins: Tensor | None = None, *, norm_weight: Tensor | None = None, eps: float = 0.0,
             rms_only: bool = False, swiglu: bool = False, residual: Tensor | None = None,
             res_scale: float = 1.0, out_dtype: torch.dtype | None = None,
             config: GemvConfig | None = None) -> Tensor:
    """Y = epilogue(prologue(X) W^T) for the rows of X on the CUDA cores, each weight tile read once
    per block_m(M) rows. Arguments and result as torchchat.kernels.gemv_rows.gemv_rows's: x (M, K)
    contiguous in the model dtype -> (M, N) in `out_dtype` (default x's dtype). Integer formats only
    (FewRowsError otherwise)."""
    if fmt not in FORMATS:
        raise FewRowsError(f"the few-rows CUDA-core kernel takes {', '.join(FORMATS)}, not {fmt!r}")
    m, k = x.shape
    n_w = weight.shape[0]
    n = n_w // 2 if swiglu else n_w
    block = pack_block(fmt, groupsize)
    cfg = config or pick_few_config(fmt, m, n, k, block, swiglu)
    if cfg.block_k % block:
        raise FewRowsError(f"a step of {cfg.block_k} inputs is not a multiple of {fmt}'s block of {block}")
    bm = block_m(m)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, bm))
    use_pdl = pdl_enabled(x)
    _gemv_few_kernel[grid](
        x, norm_weight if norm_weight is not None else x, weight, scales, mins if mins is not None else x,
        residual if residual is not None else x, out,
        m, n, k, weight.shape[1], k // block, n, eps, res_scale,
        FMT=_FMT_CODE[fmt], GROUP=block, PER_ROW=fmt == "int8" and groupsize == 0,
        NORM=2 if rms_only else int(norm_weight is not None), SWIGLU=swiglu, RESIDUAL=residual is not None,
        PDL=use_pdl, ASM=x.is_cuda, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NORM_BLOCK=min(512, triton.next_power_of_2(k)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl,
    )
    return out
