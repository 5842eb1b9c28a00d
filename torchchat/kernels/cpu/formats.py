"""GGUF block formats the CPU kernels run, and packers that write them from float weights.

A packed weight is a uint8 tensor (n, row_bytes): each output row holds its GGUF blocks exactly as
in a .gguf file, so a GGUF tensor's bytes are used as they are, and rows of several matrices of one
type can be concatenated (stacked q|k|v). Block layouts follow ggml-common.h:

| type | id | values/block | bytes/block | weight |
|---|---|---|---|---|
| Q4_0 | 2 | 32 | 18 | d * (q - 8), q 4-bit, d fp16 |
| Q4_1 | 3 | 32 | 20 | d * q + m, d and m fp16 |
| Q5_0 | 6 | 32 | 22 | d * (q - 16), q 5-bit (high bits in a 32-bit qh) |
| Q5_1 | 7 | 32 | 24 | d * q + m, q 5-bit |
| Q8_0 | 8 | 32 | 34 | d * q, q int8 |
| Q4_K | 12 | 256 | 144 | d * sc_j * q - dmin * m_j, 8 sub-blocks with 6-bit sc/m |
| Q5_K | 13 | 256 | 176 | as Q4_K with 5-bit q |
| Q6_K | 14 | 256 | 210 | d * sc_j * (q - 32), 16 sub-blocks of 16 with int8 sc |

The packers serve torchchat's own recipes (linear:int8, linear:int4, linear:a8w4dq): a group size
larger than 32 (a multiple of it) repeats the group's scale (and min) in each of its 32-value blocks.
Scales are stored as fp16, as GGUF does: a recipe's float32 scales are rounded to fp16."""
from __future__ import annotations

import torch
from torch import Tensor

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
# qtype -> (values per block, bytes per block)
BLOCKS: dict[int, tuple[int, int]] = {
    Q4_0: (32, 18),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q5_1: (32, 24),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q5_K: (256, 176),
    Q6_K: (256, 210),
}
SUPPORTED_QTYPES: frozenset[int] = frozenset(BLOCKS)
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}

# Row-interleaved layouts (csrc/common.h): type id | X16, 16 rows stored together block by block, made
# at load time for the kernels (torchchat.kernels.cpu.interleave). Bytes per block and row; Q4_K's and
# Q5_K's expanded 6-bit scales make them 148 and 180 instead of 144 and 176.
X16 = 256
X16_BLOCK_BYTES: dict[int, int] = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34, Q4_K: 148, Q5_K: 180, Q6_K: 210}
for _q, _bytes in X16_BLOCK_BYTES.items():
    BLOCKS[_q | X16] = (BLOCKS[_q][0], _bytes)
    NAMES[_q | X16] = NAMES[_q] + "x16"


def _check_qtype(qtype: int) -> None:
    if qtype not in BLOCKS:
        valid = ", ".join(f"{q} ({NAMES[q]})" for q in sorted(BLOCKS))
        raise ValueError(f"GGUF type {qtype} has no CPU kernel; supported: {valid}")


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one packed row of k values. Raises ValueError when k is not a multiple of the block."""
    _check_qtype(qtype)
    elems, nbytes = BLOCKS[qtype]
    if k <= 0 or k % elems:
        raise ValueError(f"{NAMES[qtype]} needs k to be a positive multiple of {elems}, got {k}")
    return k // elems * nbytes


def _groups(weight: Tensor, group_size: int) -> Tensor:
    """(n, k) float -> (n, k // group_size, group_size) float32, with the shapes checked."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (n, k) weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if group_size < 32 or group_size % 32 or k % group_size:
        raise ValueError(f"group_size must be a multiple of 32 dividing k={k}, got {group_size}")
    return weight.detach().float().reshape(n, k // group_size, group_size)


def _per_block(v: Tensor, group_size: int) -> Tensor:
    """(n, groups) per-group values -> (n, k // 32) per 32-value block, as fp16 bytes (n, k//32, 2)."""
    return v.repeat_interleave(group_size // 32, dim=1).to(torch.float16).contiguous().view(torch.uint8).reshape(
        v.shape[0], -1, 2)


def _nibbles(codes: Tensor) -> Tensor:
    """(n, k) codes 0..15 -> (n, k // 32, 16) bytes: value j in the low nibble of byte j, value j+16 high."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return c[:, :, 0] | (c[:, :, 1] << 4)


def pack_q8_0(weight: Tensor) -> Tensor:
    """Float (n, k) -> Q8_0 rows (n, k // 32 * 34) uint8: per 32 values d = max|w| / 127, q = round(w / d)."""
    g = _groups(weight, 32)
    n, nb, _ = g.shape
    d = (g.abs().amax(-1) / 127.0).to(torch.float16).float()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(g * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return torch.cat([_per_block(d, 32), q.view(torch.uint8)], dim=-1).reshape(n, nb * 34)


def pack_q4_0_codes(codes: Tensor, scales: Tensor) -> Tensor:
    """Q4_0 rows from codes (n, k) in 0..15 and scales (n, k // group_size): w = scale * (code - 8).
    (torchao's symmetric int4, q in -8..7, is code = q + 8.)"""
    n, k = codes.shape
    group_size = k // scales.shape[1]
    _groups(codes, group_size)  # shape checks
    return torch.cat([_per_block(scales.float(), group_size), _nibbles(codes)], dim=-1).reshape(n, k // 32 * 18)


def pack_q4_0(weight: Tensor, group_size: int = 32) -> Tensor:
    """Float (n, k) -> Q4_0 rows, symmetric like ggml: per group d = -w_absmax / 8 (w_absmax: the value
    of largest magnitude, with its sign), code = clamp(round(w / d) + 8, 0, 15)."""
    g = _groups(weight, group_size)
    n, ng, gs = g.shape
    idx = g.abs().argmax(-1, keepdim=True)
    d = (torch.gather(g, -1, idx).squeeze(-1) / -8.0).to(torch.float16).float()
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    codes = (torch.round(g * inv.unsqueeze(-1)) + 8).clamp(0, 15).reshape(n, ng * gs)
    return pack_q4_0_codes(codes, d)


def pack_q4_1_codes(codes: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """Q4_1 rows from codes (n, k) in 0..15, scales and mins (n, k // group_size): w = scale * code + min.
    (An affine int4 with zero point z has min = -z * scale.)"""
    n, k = codes.shape
    group_size = k // scales.shape[1]
    _groups(codes, group_size)
    parts = [_per_block(scales.float(), group_size), _per_block(mins.float(), group_size), _nibbles(codes)]
    return torch.cat(parts, dim=-1).reshape(n, k // 32 * 20)


def pack_q4_1(weight: Tensor, group_size: int = 32) -> Tensor:
    """Float (n, k) -> Q4_1 rows: per group d = (max - min) / 15, m = min, code = round((w - m) / d)."""
    g = _groups(weight, group_size)
    n, ng, gs = g.shape
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15.0).to(torch.float16).float()
    m = lo.to(torch.float16).float()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    codes = torch.round((g - m.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15).reshape(n, ng * gs)
    return pack_q4_1_codes(codes, d, m)
