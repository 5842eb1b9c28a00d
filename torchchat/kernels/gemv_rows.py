"""Products of a few input rows with one stored weight (small-batch decode) in Triton, with the same
fused prologue and epilogues as the one-row GEMV (gemv.py): Y = epilogue(prologue(X) W^T), X (M, K).

Decoding B sequences at once (the server's batched engine) multiplies B rows by every weight matrix.
Run row by row, each of the B GEMVs would read the whole weight again; here each program loads a tile
of weight rows once, dequantizes it in registers and multiplies it by up to BLOCK_M = 16 input rows
with `tl.dot` (tensor cores on the GPU; the rows past M are masked, as tl.dot needs M >= 16). A step
of B <= 16 rows therefore reads the weights once, like a batch-1 step, and adds only the arithmetic.
More than 16 rows take a second grid axis (each block of 16 rows reads the weights again).

Roundings: the tile is dequantized to the model dtype exactly as formats.dequantize computes it (one
rounding of q * s [+ m]) before the product, which accumulates in float32, so the result is the
prefill path's F.linear on the dequantized weight up to summation order; per-channel int8 multiplies
the integers and scales the float32 sums by the row's scale instead (exact integers in bf16). The
prologue and epilogues round as gemv.py's do. The one-row path keeps its own kernel (gemv.py), whose
tiles are tuned for streaming one vector and compile to the same code as before. For integer
formats a second kernel, gemv_few.py, multiplies a few rows on the CUDA cores instead (no operand
layout change per nibble field), and for int4 a third, gemv_mma.py, on the tensor cores with one dot
per weight tile built in the MMA's register layout; ROWS_KERNELS below says which kernel serves
which (format, M).

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
from torchchat.kernels.gemv import _FMT_CODE, GemvConfig, _unpack, pdl_enabled

BLOCK_M = 16  # rows per program: tl.dot's smallest M


@triton.jit
def _rstd_rows(x_ptr, m64, mmask, K, eps, NORM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """(BLOCK_M,) 1 / sqrt(mean(x^2) + eps) of each row (ones without NORM); masked rows give
    1 / sqrt(eps), never read."""
    if NORM:
        acc = tl.zeros([BLOCK_M, BLOCK], tl.float32)
        for k0 in range(0, K, BLOCK):
            kk = k0 + tl.arange(0, BLOCK)
            xv = tl.load(x_ptr + m64[:, None] * K + kk[None, :], mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
            xv = xv.to(tl.float32)
            acc += xv * xv
        r = 1.0 / tl.sqrt(tl.sum(acc, 1) / K + eps)
    else:
        r = tl.full([BLOCK_M], 1.0, tl.float32)
    return r


@triton.jit
def _load_xm(x_ptr, g_ptr, xoff, goff, mask, rstd, NORM: tl.constexpr):
    """X at offsets `xoff` in the model dtype; with NORM == 1 RMSNorm'd with weight g (at `goff`) and
    rounded as the RMSNorm module rounds; `rstd` broadcasts against xoff."""
    xv = tl.load(x_ptr + xoff, mask=mask, other=0.0)
    if NORM == 1:
        dt = x_ptr.dtype.element_ty
        xv = (xv.to(tl.float32) * rstd).to(dt)
        gv = tl.load(g_ptr + goff, mask=mask, other=0.0)
        xv = (xv.to(tl.float32) * gv.to(tl.float32)).to(dt)
    return xv


@triton.jit
def _mdot(acc, xv, w, IEEE: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += xv (BLOCK_M, L) @ w (BLOCK_N, L)^T, both in the model dtype. With
    IEEE (float32 models, and Triton's CPU interpreter, whose dot of bf16 operands is wrong: a 16x16
    product came out near 1e10 in Triton 3.7) the operands are widened (exactly) and multiplied in
    full float32, not TF32, as the modules do."""
    if IEEE:
        return tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(xv, tl.trans(w), acc)


@triton.jit
def _mrows_float(x_ptr, g_ptr, w_ptr, rows64, rmask, m64, mmask, rstd, K,
                 NORM: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    dt = x_ptr.dtype.element_ty
    ki = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ki
        kmask = kk < K
        w = tl.load(w_ptr + rows64[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        xv = _load_xm(x_ptr, g_ptr, m64[:, None] * K + kk[None, :], kk[None, :], mmask[:, None] & kmask[None, :],
                      rstd[:, None], NORM)
        acc = _mdot(acc, xv, w.to(dt), IEEE)
    return acc


@triton.jit
def _mrows_int8(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, rstd, K, KW, KB,
                NORM: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, GROUP: tl.constexpr,
                PER_ROW: tl.constexpr, MINS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Layout as in gemv._rows_int8: in each block of GROUP inputs byte j of word w is input
    # j*GROUP/4 + w, read biased by 128. A tile is (BLOCK_N, L) words, contiguous in each row; column
    # c is word c % WB of block c // WB, so byte field j is a (BLOCK_N, L) matrix whose column c meets
    # input (b0 + c // WB)*GROUP + j*WB + c % WB, gathered from X the same way. Scales are read per
    # column (each repeated WB times: cache hits), which keeps every tile two-dimensional.
    dt = x_ptr.dtype.element_ty
    NB: tl.constexpr = BLOCK_K // GROUP
    WB: tl.constexpr = GROUP // 4
    L: tl.constexpr = NB * WB
    c = tl.arange(0, L)
    cb = c // WB
    cw = c % WB
    base = w_ptr + rows64[:, None] * KW + c[None, :]
    words_next = tl.load(base, mask=rmask[:, None] & (cb < KB)[None, :], other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b0 in range(0, KB, NB):
        words = words_next
        words_next = tl.load(base + (b0 + NB) * WB, mask=rmask[:, None] & (b0 + NB + cb < KB)[None, :], other=0)
        b = b0 + cb
        bmask = b < KB
        words = words ^ -2139062144  # 0x80808080: q + 128 in every byte
        high = words >> 16
        if not PER_ROW:
            soff = rows64[:, None] * KB + b[None, :]
            smask = rmask[:, None] & bmask[None, :]
            s = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)
            if MINS:
                mn = tl.load(m_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        for j in tl.static_range(4):
            q = _unpack(words if j < 2 else high, 8 * (j % 2), 8, ASM) - 128.0
            if PER_ROW:
                w = q
            elif MINS:
                w = q * s + mn
            else:
                w = q * s
            idx = b * GROUP + j * WB + cw
            xv = _load_xm(x_ptr, g_ptr, m64[:, None] * K + idx[None, :], idx[None, :],
                          mmask[:, None] & bmask[None, :], rstd[:, None], NORM)
            acc = _mdot(acc, xv, w.to(dt), IEEE)
    if PER_ROW:
        s_row = tl.load(s_ptr + rows64, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * s_row[None, :]
    return acc


@triton.jit
def _mrows_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, rstd, K, KW, KG,
                NORM: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Layout as in gemv._rows_int4: nibble i of word w in group g is input g*GROUP + i*GROUP/8 + w.
    # Tiles as in _mrows_int8: column c is word c % WS of group c // WS.
    dt = x_ptr.dtype.element_ty
    NG: tl.constexpr = BLOCK_K // GROUP
    WS: tl.constexpr = GROUP // 8
    L: tl.constexpr = NG * WS
    c = tl.arange(0, L)
    cg = c // WS
    cw = c % WS
    base = w_ptr + rows64[:, None] * KW + c[None, :]
    words_next = tl.load(base, mask=rmask[:, None] & (cg < KG)[None, :], other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g0 in range(0, KG, NG):
        words = words_next
        words_next = tl.load(base + (g0 + NG) * WS, mask=rmask[:, None] & (g0 + NG + cg < KG)[None, :], other=0)
        g = g0 + cg
        gmask = g < KG
        high = words >> 12  # nibbles 5..7 down to bits 8..19
        soff = rows64[:, None] * KG + g[None, :]
        smask = rmask[:, None] & gmask[None, :]
        s = tl.load(s_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        mn = tl.load(m_ptr + soff, mask=smask, other=0.0).to(tl.float32)
        for i in tl.static_range(8):
            q = _unpack(words if i < 5 else high, 4 * i - 12 * (i >= 5), 4, ASM)
            w = q * s + mn
            idx = g * GROUP + i * WS + cw
            xv = _load_xm(x_ptr, g_ptr, m64[:, None] * K + idx[None, :], idx[None, :],
                          mmask[:, None] & gmask[None, :], rstd[:, None], NORM)
            acc = _mdot(acc, xv, w.to(dt), IEEE)
    return acc


@triton.jit
def _mrows(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, rstd, K, KW, KB,
           FMT: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, NORM: tl.constexpr,
           IEEE: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 products of the prologue'd input rows with weight rows `rows64`."""
    if FMT == 0:
        acc = _mrows_float(x_ptr, g_ptr, w_ptr, rows64, rmask, m64, mmask, rstd, K, NORM, IEEE,
                           BLOCK_M, BLOCK_N, BLOCK_K)
    elif FMT == 1 or FMT == 3:
        acc = _mrows_int8(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, rstd, K, KW, KB,
                          NORM, IEEE, ASM, GROUP, PER_ROW, FMT == 3, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _mrows_int4(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, rstd, K, KW, KB,
                          NORM, IEEE, ASM, GROUP, BLOCK_M, BLOCK_N, BLOCK_K)
    if NORM == 2:  # the norm weight is folded into W: norm(x) W^T = rstd * (x W^T)
        acc = acc * rstd[:, None]
    return acc


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every batch size, not one per M % 16 class
def _gemv_rows_kernel(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, r_ptr, y_ptr,
                      M, N, K, KW, KB, ROWS2, eps, res_scale,
                      FMT: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, NORM: tl.constexpr,
                      SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
                      ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM_BLOCK: tl.constexpr):
    """Outputs [pid0*BLOCK_N, ...) of input rows [pid1*BLOCK_M, ...): X (M, K), Y (M, N)."""
    if PDL:  # see gemv.py; everything below may read the previous kernel's output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    m64 = m.to(tl.int64)
    rstd = _rstd_rows(x_ptr, m64, mmask, K, eps, NORM, NORM_BLOCK, BLOCK_M)
    y = _mrows(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64, rmask, m64, mmask, rstd, K, KW, KB,
               FMT, GROUP, PER_ROW, NORM, IEEE, ASM, BLOCK_M, BLOCK_N, BLOCK_K)
    up = y
    if SWIGLU:
        up = _mrows(x_ptr, g_ptr, w_ptr, s_ptr, m_ptr, rows64 + ROWS2, rmask, m64, mmask, rstd, K, KW, KB,
                    FMT, GROUP, PER_ROW, NORM, IEEE, ASM, BLOCK_M, BLOCK_N, BLOCK_K)
    _store_rows(y, up, x_ptr, r_ptr, y_ptr, m64, mmask, rows64, rmask, N, res_scale, SWIGLU, RESIDUAL)


@triton.jit
def _store_rows(y, up, x_ptr, r_ptr, y_ptr, m64, mmask, rows64, rmask, N, res_scale,
                SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    """The epilogues, rounded as gemv.py's: y (BLOCK_M, BLOCK_N) float32 products of input rows m64
    with weight rows rows64 (`up`: with the w3 rows, for SWIGLU) -> Y[m64, rows64] (M, N)."""
    dt = x_ptr.dtype.element_ty
    y = y.to(dt)
    if SWIGLU:
        a = y.to(tl.float32)
        y = (a / (1.0 + tl.exp(-a))).to(dt)  # silu, as PyTorch computes it
        y = (y.to(tl.float32) * up.to(dt).to(tl.float32)).to(dt)
    out = m64[:, None] * N + rows64[None, :]
    omask = mmask[:, None] & rmask[None, :]
    if RESIDUAL:
        r = tl.load(r_ptr + out, mask=omask, other=0.0)
        y = (y.to(tl.float32) * res_scale).to(dt)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(dt)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=omask)


# Tiles per format, the best of a sweep on an H100 (2026-12-06, 7B shape, bench/cuda_batch_bench.py with
# TORCHCHAT_GEMV_ROWS_TILES, batch 8 against batch 1): float [32, 256, 4 warps, 3 stages] 5.68x (the first
# guess [16, 256] gave 4.69x, [64, 128] 5.11x, [32, 128] 3.81x); int8 [32, 256, 4] 4.20x ([16, 512] 3.53x,
# [64, 256] 3.55x); int4 [64, 512, 8] 1.89x ([16, 1024, 4] 1.84x, [32, 512, 4] 1.84x, 256 inputs 1.4x):
# the int4 tile is not what limits it (below 250 GB/s of weights at any tile). tl.dot needs BLOCK_N >= 16
# and L = BLOCK_K / fields >= 16. The float loop is a plain load -> dot matmul loop, which Triton's
# pipeliner overlaps over num_stages tiles; the integer loops prefetch the next tile by hand (as gemv.py's).
# Override per format with TORCHCHAT_GEMV_ROWS_TILES='{"int4": [block_n, block_k, num_warps(, num_stages)], ...}'.
_CONFIGS = {
    "float": GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=3),
    "int8": GemvConfig(block_n=32, block_k=256, num_warps=4),
    "int4": GemvConfig(block_n=64, block_k=512, num_warps=8),
}


def pick_rows_config(fmt: str, n: int, k: int, block: int) -> GemvConfig:
    """The tile for n outputs of k inputs; `block`: the packing block of integer formats."""
    tiles = dict(_CONFIGS)
    text = os.environ.get("TORCHCHAT_GEMV_ROWS_TILES", "")
    if text:
        for key, tile in json.loads(text).items():
            tiles[key] = GemvConfig(*tile)
    base = tiles["int8" if fmt == "int8_asym" else fmt]
    fields = {"float": 1, "int4": 8}.get(fmt, 4)
    block_k = min(base.block_k, max(triton.next_power_of_2(k), 16 * fields))
    if fmt != "float":
        block_k = max(block_k, block, 16 * fields)
    block_n = max(16, min(base.block_n, triton.next_power_of_2(n)))
    return GemvConfig(block_n, block_k, base.num_warps, base.num_stages)


# Which kernel multiplies M input rows of each format: "dot" (tl.dot on the tensor cores, this module),
# "fma" (gemv_few.py: CUDA cores, integer formats only) or "mma" (gemv_mma.py: tensor cores, one dot per
# int4 weight tile, int4 only), as (up to M rows, kernel) pairs, the first that covers M wins; past the
# last pair, "dot". bench/cuda_rows_bench.py --kernels dot fma mma times them side by side.
ROWS_KERNELS: dict[str, tuple[tuple[int, str], ...]] = {
    "float": ((16, "dot"),),
    "int8": ((16, "dot"),),
    "int8_asym": ((16, "dot"),),
    # int4 (H100, 7B shapes). Whole decode steps (bench/cuda_batch_bench.py, CUDA graphs): the CUDA-core
    # kernel's cost grows with the rows (seventh session: 2/3/4/6 rows 5.11/8.25/8.38/11.78 ms); the
    # one-dot tensor-core kernel's barely moves (its programs take 16 rows), and since it splits K
    # (gemv_mma.SPLIT_TARGET) 2/3/4/6/8/16 rows take 6.03/6.04/6.09/6.33/6.57/7.04 ms. So fma for 2 rows,
    # mma from 3. Past 16 rows (a short prompt's prefill, modules.SHORT_PREFILL_ROWS) each 16 rows are
    # one more pass.
    "int4": ((2, "fma"), (64, "mma")),
}
KERNELS = ("dot", "fma", "mma")
_FMA_FORMATS = ("int8", "int8_asym", "int4")  # gemv_few.FORMATS, without importing it here
_MMA_FORMATS = ("int4",)  # gemv_mma.FORMATS


def rows_kernel(fmt: str, m: int) -> str:
    """"dot", "fma" or "mma": the kernel for m rows of `fmt`, from ROWS_KERNELS.
    TORCHCHAT_ROWS_KERNEL=dot|fma|mma forces one (for benchmarking) wherever it applies, "dot"
    elsewhere: the float format has no fma kernel, only int4 has an mma one."""
    forced = os.environ.get("TORCHCHAT_ROWS_KERNEL", "")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"TORCHCHAT_ROWS_KERNEL={forced!r}: expected one of {', '.join(KERNELS)}")
        applies = {"dot": True, "fma": fmt in _FMA_FORMATS, "mma": fmt in _MMA_FORMATS}[forced]
        return forced if applies else "dot"
    return next((kernel for rows, kernel in ROWS_KERNELS[fmt] if m <= rows), "dot")


def gemv_rows(x: Tensor, fmt: str, groupsize: int, weight: Tensor, scales: Tensor | None = None,
              mins: Tensor | None = None, *, norm_weight: Tensor | None = None, eps: float = 0.0,
              rms_only: bool = False, swiglu: bool = False, residual: Tensor | None = None,
              res_scale: float = 1.0, out_dtype: torch.dtype | None = None,
              config: GemvConfig | None = None, kernel: str | None = None) -> Tensor:
    """Y = epilogue(prologue(X) W^T) for the rows of X, each weight tile read once per 16 rows.

    x: (M, K) contiguous, the model dtype; the other arguments as torchchat.kernels.gemv.gemv's,
    per row (residual: (M, N)). Returns (M, N) in `out_dtype` (default x's dtype). `kernel`: "dot",
    "fma" (integer formats; `config` is then a gemv_few tile) or "mma" (int4; a gemv_mma tile),
    default rows_kernel(fmt, M)."""
    m, k = x.shape
    kernel = kernel or rows_kernel(fmt, m)
    if kernel == "fma":
        # Imported here: gemv_few imports this module's prologue and epilogue helpers.
        from torchchat.kernels.gemv_few import gemv_few

        return gemv_few(x, fmt, groupsize, weight, scales, mins, norm_weight=norm_weight, eps=eps,
                        rms_only=rms_only, swiglu=swiglu, residual=residual, res_scale=res_scale,
                        out_dtype=out_dtype, config=config)
    if kernel == "mma":
        from torchchat.kernels.gemv_mma import gemv_mma  # imported here, as gemv_few above

        return gemv_mma(x, fmt, groupsize, weight, scales, mins, norm_weight=norm_weight, eps=eps,
                        rms_only=rms_only, swiglu=swiglu, residual=residual, res_scale=res_scale,
                        out_dtype=out_dtype, config=config)
    if kernel != "dot":
        raise ValueError(f"kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    n_w = weight.shape[0]
    n = n_w // 2 if swiglu else n_w
    block = pack_block(fmt, groupsize) if fmt != "float" else 0
    cfg = config or pick_rows_config(fmt, n, k, block)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, BLOCK_M))
    use_pdl = pdl_enabled(x)
    _gemv_rows_kernel[grid](
        x, norm_weight if norm_weight is not None else x, weight,
        scales if scales is not None else x, mins if mins is not None else x,
        residual if residual is not None else x, out,
        m, n, k, weight.shape[1], k // block if block else 1, n, eps, res_scale,
        FMT=_FMT_CODE[fmt], GROUP=block, PER_ROW=fmt == "int8" and groupsize == 0,
        NORM=2 if rms_only else int(norm_weight is not None), SWIGLU=swiglu, RESIDUAL=residual is not None,
        IEEE=x.dtype == torch.float32 or not x.is_cuda, PDL=use_pdl, ASM=x.is_cuda, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, NORM_BLOCK=min(512, triton.next_power_of_2(k)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=use_pdl,
    )
    return out
