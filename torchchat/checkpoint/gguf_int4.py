"""Q4_0 weights kept 4-bit, as torchao int4 tensors run by the tinygemm kernels.

Q4_0 stores w = d * (q - 8) per block of 32, q in [0, 15], d an fp16 scale. tinygemm's int4 format
computes w = (q - 8) * scale + zero per group, so Q4_0 maps onto it exactly with group size 32,
scale = d and zero = 0: the codes are repacked, never re-quantized. (In bfloat16 the scale is rounded
to bfloat16, the only difference from the dequantized weight.)

Where it runs: the CPU kernel (`_weight_int4pack_mm_for_cpu`, torchao's Int4OpaqueTensor) with
bfloat16 activations, and the CUDA kernel (`_weight_int4pack_mm`, Int4TilePackedTo4dTensor) on GPUs of
compute capability 8.0 or newer with bfloat16. Elsewhere Q4_0 is dequantized like the other types: in
float32 the CPU kernel is 6-8x slower than a dense float32 matmul (bench/gguf_int4.py), and MPS has none.

Q8_0 (int8 codes, one fp16 scale per 32) has no torchao kernel for 32-element groups: torchao's
group-wise int8 weight tensor dequantizes the whole matrix on every call, about 30x slower than a
dense matmul on the CPU, so Q8_0 is always dequantized.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GROUP = 32


def int4_kernel_runs(device: str, dtype: torch.dtype) -> bool:
    """True where a Q4_0 weight kept 4-bit runs on a torchao int4 kernel for this device and dtype."""
    kind = torch.device(device).type
    if dtype != torch.bfloat16:
        return False
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] >= 8
    return False


def _scale_and_zero(scales: Tensor) -> Tensor:
    """tinygemm's packed qparams: scales (N, G) -> (G, N, 2) holding (scale, zero=0)."""
    return torch.stack([scales, torch.zeros_like(scales)], dim=-1).transpose(0, 1).contiguous()


def _padded(codes: np.ndarray, scales: np.ndarray, n_pad: int, k_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales grown to (n_pad, k_pad); the new codes are 8 with scale 0, i.e. weight 0."""
    n, k = codes.shape
    full = np.full((n_pad, k_pad), 8, dtype=np.uint8)
    full[:n, :k] = codes
    full_scales = np.zeros((n_pad, k_pad // GROUP), dtype=np.float32)
    full_scales[:n, : k // GROUP] = scales
    return full, full_scales


def int4_weight(codes: np.ndarray, scales: np.ndarray, device: str, dtype: torch.dtype) -> Tensor:
    """A torchao int4 weight tensor equal to scales * (codes - 8) in groups of 32 along K.

    codes: (N, K) uint8 in [0, 15]; scales: (N, K // 32) float32. Returns a tensor of shape (N, K) that
    `F.linear` runs on the int4 kernel of `device`."""
    n, k = codes.shape
    kind = torch.device(device).type
    if kind == "cpu":
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        # The CPU packing wants N a multiple of 16; the linear slices the padded outputs off.
        full, full_scales = _padded(codes, scales, -(-n // 16) * 16, k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(full.astype(np.int32)), 1)
        qparams = _scale_and_zero(torch.from_numpy(full_scales).to(dtype))
        return Int4OpaqueTensor(qdata=packed, scale_and_zero=qparams, block_size=[1, GROUP], shape=torch.Size([n, k]))
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import Int4TilePackedTo4dTensor

    # The CUDA kernel wants K padded to a multiple of 1024 (the activations are zero-padded to match)
    # and N to a multiple of 8.
    full, full_scales = _padded(codes, scales, -(-n // 8) * 8, -(-k // 1024) * 1024)
    nibbles = torch.from_numpy(full[:, ::2] << 4 | full[:, 1::2]).to(device)
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), 8)
    qparams = _scale_and_zero(torch.from_numpy(full_scales).to(device=device, dtype=torch.bfloat16))
    return Int4TilePackedTo4dTensor(qdata=packed, scale_and_zero=qparams, block_size=[1, GROUP], shape=torch.Size([n, k]))
