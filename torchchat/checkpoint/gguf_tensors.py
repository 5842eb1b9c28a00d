"""GGUF tensor data -> torch tensors: float types as zero-copy views, quantized types dequantized with
the `gguf` package's reference (numpy) kernels, and Q4_0 unpacked into its 4-bit codes and scales for
the int4 path (checkpoint/gguf_int4.py)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from torchchat.errors import CheckpointError

# GGMLQuantizationType names torchchat loads. Block layouts are llama.cpp's (ggml-common.h).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K", "Q5_K")
_Q4_0_BLOCK = 32  # elements per block
_Q4_0_BYTES = 18  # fp16 scale d + 16 bytes holding 32 4-bit codes


def torch_shape(dims) -> tuple[int, ...]:
    """GGUF dims (innermost first) -> torch shape (outermost first)."""
    return tuple(int(d) for d in reversed(list(dims)))


def to_dense(tensor, dtype: torch.dtype, source: str) -> Tensor:
    """A gguf ReaderTensor as a dense tensor of its torch shape. F32/F16 come back as views of the
    (copy-on-write) memory map in their own dtype; BF16 likewise; quantized types are dequantized
    to `dtype`."""
    from gguf import quants

    kind = tensor.tensor_type.name
    shape = torch_shape(tensor.shape)
    data = tensor.data
    if kind in ("F32", "F16"):
        return torch.from_numpy(data).reshape(shape)
    if kind == "BF16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(shape)
    if kind not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{source}: tensor '{tensor.name}' has type {kind}, which torchchat does not load; supported types: "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    dense = quants.dequantize(data, tensor.tensor_type)  # float32, torch shape
    return torch.from_numpy(np.ascontiguousarray(dense)).reshape(shape).to(dtype)


def unpack_q4_0(tensor) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 blocks -> (codes, scales). codes: (N, K) uint8 in [0, 15]; scales: (N, K // 32) float32.
    The weight is scales * (codes - 8), block by block along K. In a block, byte j holds element j in
    its low nibble and element j + 16 in its high nibble."""
    n, k = torch_shape(tensor.shape)
    blocks = np.asarray(tensor.data).reshape(n, k // _Q4_0_BLOCK, _Q4_0_BYTES)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k)
    return codes, scales
