"""RMSNorm of whole rows in Triton (the final norm before the output projection; the norms inside
decoder layers are fused into the following GEMV instead).

Import only on CUDA machines (or with TRITON_INTERPRET=1 for the CPU tests): this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchchat.kernels.gemv import pdl_enabled


@triton.jit
def _rmsnorm_kernel(x_ptr, g_ptr, y_ptr, K, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # see torchchat.kernels.gemv
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64) * K
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        xv = tl.load(x_ptr + row + kk, mask=kk < K, other=0.0).to(tl.float32)
        acc += xv * xv
    rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / K + eps)
    dt = x_ptr.dtype.element_ty
    for k0 in range(0, K, BLOCK):
        kk = k0 + tl.arange(0, BLOCK)
        kmask = kk < K
        xv = (tl.load(x_ptr + row + kk, mask=kmask, other=0.0).to(tl.float32) * rstd).to(dt)
        gv = tl.load(g_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row + kk, (xv.to(tl.float32) * gv).to(dt), mask=kmask)


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension of a contiguous x, one program per row, rounded as the module."""
    k = x.shape[-1]
    out = torch.empty_like(x)
    pdl = pdl_enabled(x)
    _rmsnorm_kernel[(x.numel() // k,)](x, weight, out, k, eps, BLOCK=min(8192, triton.next_power_of_2(k)), PDL=pdl,
                                       num_warps=4, launch_pdl=pdl)
    return out
