"""Dequantization of the fused path's integer formats (formats.py) in one Triton kernel.

Prefill on the fused path multiplies prompt chunks by the dequantized weight, a slice of rows at a
time (FusedLinear.linear). `formats.dequantize` does it with PyTorch ops, which widen every packed
value to int64 and then float32 in separate passes: about 300 bytes of memory traffic and a dozen
kernel launches per 8M weights, which made a 7B int4 prefill take ~0.23 s on the H100 whatever the
prompt length (a short chat turn's time to first token). This kernel reads each packed word once and
writes the model dtype once.

Same values as `formats.dequantize`: q * s (+ m) in float32, rounded once to the output dtype (the
compiler may fuse the multiply and add of int8_asym/int4 into one FMA, which rounds once where
PyTorch rounds twice: the float32 results can differ in the last bit, so the rounded output can
differ in rare ties; tests/kernels/test_dequant.py states the tolerance).

Import only on CUDA machines (or with TRITON_INTERPRET=1 for the CPU tests): this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchchat.kernels.formats import group_of, pack_block

_BITS = {"int8": 8, "int8_asym": 8, "int4": 4}
BLOCK_R, BLOCK_W = 8, 64  # rows x packed words per program: 2 KiB of int32 read, 8-16 KiB written


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, KW, KG,
                    BITS: tl.constexpr, SIGNED: tl.constexpr, MINS: tl.constexpr, BLOCK: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[n, b*BLOCK + i*WB + w] = field i of word (n, b*WB + w) times its group's scale (+ min)."""
    PER: tl.constexpr = 32 // BITS
    WB: tl.constexpr = BLOCK // PER  # words per packing block
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    rmask = rows < N
    mask = rmask[:, None] & (kw < KW)[None, :]
    rows64 = rows.to(tl.int64)
    words = tl.load(w_ptr + rows64[:, None] * KW + kw[None, :], mask=mask, other=0)
    b = kw // WB
    w = kw % WB
    K = KW * PER
    for i in tl.static_range(PER):
        col = b * BLOCK + i * WB + w
        g = col // GROUP
        soff = rows64[:, None] * KG + g[None, :]
        s = tl.load(s_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        if SIGNED:  # the byte's sign bit to bit 31, then an arithmetic shift back
            q = (words << (24 - BITS * i)) >> 24
        else:
            q = (words >> (BITS * i)) & ((1 << BITS) - 1)
        v = q.to(tl.float32) * s
        if MINS:
            v += tl.load(m_ptr + soff, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows64[:, None] * K + col[None, :],
                 v.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def dequantize(fmt: str, groupsize: int, weight: Tensor, scales: Tensor, mins: Tensor | None,
               dtype: torch.dtype) -> Tensor:
    """`formats.dequantize` for an integer format's (N, KW) int32 words on a CUDA device: (N, K) in `dtype`."""
    n, kw = weight.shape
    bits = _BITS[fmt]
    k = kw * (32 // bits)
    block = pack_block(fmt, groupsize)
    group = group_of(fmt, groupsize, k)
    weight, scales = weight.contiguous(), scales.contiguous()
    mins = mins.contiguous() if mins is not None else None
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    grid = (triton.cdiv(n, BLOCK_R), triton.cdiv(kw, BLOCK_W))
    _dequant_kernel[grid](weight, scales, mins if mins is not None else scales, out, n, kw, k // group,
                          BITS=bits, SIGNED=fmt != "int4", MINS=mins is not None, BLOCK=block, GROUP=group,
                          BLOCK_R=BLOCK_R, BLOCK_W=BLOCK_W)
    return out
