"""GGUF block-quantized weights rewritten into the fused path's integer formats (formats.py), block by
block: each block's integer codes are kept and its scale (and minimum) becomes a group's scale (and
minimum). Nothing is re-quantized from floats and no float copy of a matrix is made. The scales and
minimums are fp16 in the file (for the K-quants, an fp16 super-block scale times a 6- or 8-bit
sub-block multiplier, a product float32 holds exactly); they are stored in float32 in a float32 model
(exact) and in float16 in a bf16 or fp16 one (`scale_dtype`): exact for the 32-value types, and the one
loss there is the K-quants' products rounded to float16's 11 significant bits (a relative error of at
most 2^-12 per scale and per minimum). In bf16 that is finer than the model's own rounding.

| GGUF | weight, per block                          | fused format    | bits/weight (fp16 scales)      |
|------|--------------------------------------------|-----------------|--------------------------------|
| Q4_0 | d (q - 8), 32 values                       | int4 g32        | 4.5 -> 5.0 (s = d, m = -8 d)   |
| Q4_1 | d q + m, 32                                | int4 g32        | 5.0 -> 5.0                     |
| Q4_K | d sc_j q - dmin m_j, 8 sub-blocks of 32    | int4 g32        | 4.5 -> 5.0                     |
| Q5_0 | d (q - 16), 32                             | int8 g32        | 5.5 -> 8.5                     |
| Q5_1 | d q + m, 32                                | int8_asym g32   | 6.0 -> 9.0                     |
| Q5_K | d sc_j q - dmin m_j, 8 sub-blocks of 32    | int8_asym g32   | 5.5 -> 9.0                     |
| Q6_K | d sc_j (q - 32), 16 sub-blocks of 16       | int8 g16        | 6.5625 -> 9.0                  |
| Q8_0 | d q, 32                                    | int8 g32        | 8.5 -> 8.5                     |

(float32 scales in a float32 model add 1 bit/weight per 32-value group with a scale, 2 with a
minimum.) The 5- and 6-bit codes take a whole byte: the fused kernels have no 5- or 6-bit unpacking.

Matrices the fused path stacks (q|k|v, w1|w3) may hold different types (a Q4_K_M file's Q6_K wv beside
Q4_K wq and wk): `fused_format` then picks the one format all of them convert to exactly, int8 (with
minimums if any part has them) at the smallest group.

Everything here is plain PyTorch on any device, a chunk of rows at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from torchchat.kernels.cpu.formats import BLOCKS, NAMES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from torchchat.kernels.formats import pack_block, pack_int4, pack_int8

# The fused format each GGUF type maps onto by itself: (format, groupsize).
NATIVE: dict[int, tuple[str, int]] = {
    Q4_0: ("int4", 32), Q4_1: ("int4", 32), Q4_K: ("int4", 32),
    Q5_0: ("int8", 32), Q8_0: ("int8", 32), Q6_K: ("int8", 16),
    Q5_1: ("int8_asym", 32), Q5_K: ("int8_asym", 32),
}
_WITH_MINS = frozenset((Q4_1, Q4_K, Q5_1, Q5_K))
# Weights converted at a time: each int64 temporary of a chunk is 8 MB, so the scratch a build needs
# beside the finished layers stays a few tens of MB.
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class GGMLBlocks:
    """A GGUF tensor's blocks as the file stores them: `data` uint8 (rows, row_bytes), on any device."""

    data: Tensor
    qtype: int

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def in_features(self) -> int:
        values, nbytes = BLOCKS[self.qtype]
        return self.data.shape[1] // nbytes * values

    @property
    def name(self) -> str:
        return NAMES[self.qtype]


@dataclass(frozen=True)
class Codes:
    """Decoded blocks: w = q * scales + mins (mins None: 0), per group of `group` inputs along a row.
    q: (r, k) int64, at least `lo`; scales, mins: (r, k // group) float32 (exact: fp16 times small ints)."""

    q: Tensor
    scales: Tensor
    mins: Tensor | None
    group: int
    lo: int  # the smallest code the type can hold (Q4_0: -8), so q - lo fits unsigned fields


def scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """What transcoded scales and minimums are stored in: float16 in a 16-bit model, the file's own
    type (so nothing is rounded in a bf16 model but the K-quants' products, to 11 bits rather than
    bf16's 8; the kernels read any float type), float32 in a float32 model (exact)."""
    return torch.float32 if model_dtype == torch.float32 else torch.float16


def transcodable(qtype: int) -> bool:
    return qtype in NATIVE


def fused_format(qtypes: list[int]) -> tuple[str, int]:
    """The fused (format, groupsize) that matrices of these GGUF types, stacked by rows, all convert to
    exactly: their shared native format, else int8 at the smallest group, with minimums if any has them."""
    natives = {NATIVE[q] for q in qtypes}
    if len(natives) == 1:
        return next(iter(natives))
    group = min(g for _, g in natives)
    if all(fmt == "int4" for fmt, _ in natives):
        return "int4", group
    return ("int8_asym" if any(q in _WITH_MINS for q in qtypes) else "int8"), group


def _f16(b: Tensor) -> Tensor:
    """(..., 2) little-endian fp16 bytes -> (...) float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: Tensor) -> Tensor:
    """(..., 16) bytes of a 32-value block -> (..., 32): values 0..15 in the low nibbles, 16..31 high."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _bits(x: Tensor, count: int, width: int = 1) -> Tensor:
    """(...) integers -> (..., count): field i is bits [width i, width (i + 1)) of x."""
    shifts = width * torch.arange(count, device=x.device, dtype=torch.int64)
    return (x.unsqueeze(-1) >> shifts) & ((1 << width) - 1)


def _u32(b: Tensor) -> Tensor:
    """(..., 4) little-endian bytes -> (...) int64."""
    b = b.to(torch.int64)
    return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _k_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes (..., 12) -> eight 6-bit scales and eight 6-bit mins, (..., 8) each. Bytes
    0-3: scales 0-3 and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins; bytes 8-11 the
    low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble) (llama.cpp get_scale_min_k4)."""
    s = s.to(torch.int64)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    m = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc, m


def decode(qtype: int, data: Tensor) -> Codes:
    """Blocks (r, row_bytes) uint8 -> their codes, scales and minimums (layouts: llama.cpp ggml-common.h)."""
    if qtype not in NATIVE:
        raise ValueError(f"GGUF type {NAMES.get(qtype, qtype)} has no fused transcoding; "
                         f"transcodable: {', '.join(NAMES[q] for q in NATIVE)}")
    values, nbytes = BLOCKS[qtype]
    r = data.shape[0]
    blk = data.reshape(r, -1, nbytes)  # (r, blocks, bytes)
    nb = blk.shape[1]
    k = nb * values
    if qtype == Q8_0:  # {half d; int8 qs[32]}
        q = blk[..., 2:].contiguous().view(torch.int8).to(torch.int64)
        return Codes(q.reshape(r, k), _f16(blk[..., 0:2]), None, 32, -128)
    if qtype in (Q4_0, Q4_1):  # {half d; (half m;) u8 qs[16]}
        off = 2 if qtype == Q4_0 else 4
        q = _nibbles(blk[..., off:off + 16].to(torch.int64))
        if qtype == Q4_0:
            return Codes(q.reshape(r, k) - 8, _f16(blk[..., 0:2]), None, 32, -8)
        return Codes(q.reshape(r, k), _f16(blk[..., 0:2]), _f16(blk[..., 2:4]), 32, 0)
    if qtype in (Q5_0, Q5_1):  # {half d; (half m;) u32 qh; u8 qs[16]}: bit j of qh is value j's fifth bit
        off = 2 if qtype == Q5_0 else 4
        high = _bits(_u32(blk[..., off:off + 4]), 32)
        q = _nibbles(blk[..., off + 4:off + 20].to(torch.int64)) | (high << 4)
        if qtype == Q5_0:
            return Codes(q.reshape(r, k) - 16, _f16(blk[..., 0:2]), None, 32, -16)
        return Codes(q.reshape(r, k), _f16(blk[..., 0:2]), _f16(blk[..., 2:4]), 32, 0)
    if qtype in (Q4_K, Q5_K):
        # {half d, dmin; u8 scales[12]; (u8 qh[32];) u8 qs[128]}: sub-blocks 2i and 2i+1 are the low and
        # high nibbles of qs[32 i .. 32 i + 32]; Q5_K's fifth bit of value l of sub-block j is bit j of qh[l].
        d, dmin = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
        sc, m = _k_scales(blk[..., 4:16])
        qs = blk[..., -128:].to(torch.int64).reshape(r, nb, 4, 32)
        q = torch.stack([qs & 15, qs >> 4], dim=3).reshape(r, nb, 8, 32)
        if qtype == Q5_K:
            q = q | (_bits(blk[..., 16:48].to(torch.int64), 8).transpose(-1, -2) << 4)
        scales = d.unsqueeze(-1) * sc.float()
        mins = -(dmin.unsqueeze(-1) * m.float())
        return Codes(q.reshape(r, k), scales.reshape(r, nb * 8), mins.reshape(r, nb * 8), 32, 0)
    if qtype == Q6_K:
        # {u8 ql[128]; u8 qh[64]; int8 scales[16]; half d}, two halves of 128 values: value 32 t + l of
        # half h takes the low (t < 2) or high (t >= 2) nibble of ql[64 h + 32 (t % 2) + l] and bits
        # 2t, 2t+1 of qh[32 h + l] on top; sub-block j (16 values) has scale d * scales[j].
        ql = blk[..., 0:128].to(torch.int64).reshape(r, nb, 2, 2, 32)
        qh = blk[..., 128:192].to(torch.int64).reshape(r, nb, 2, 32)
        low = torch.stack([ql[:, :, :, 0] & 15, ql[:, :, :, 1] & 15, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], dim=3)
        high = _bits(qh, 4, 2).transpose(-1, -2)  # (r, nb, 2, 4, 32)
        q = (low | high << 4).reshape(r, k) - 32
        sc = blk[..., 192:208].contiguous().view(torch.int8).float()
        scales = _f16(blk[..., 208:210]).unsqueeze(-1) * sc
        return Codes(q, scales.reshape(r, nb * 16), None, 16, -32)
    raise AssertionError(f"NATIVE lists {NAMES[qtype]} without a decoder")


def _chunks(blocks: GGMLBlocks):
    step = max(1, _CHUNK_ELEMENTS // blocks.in_features)
    for a in range(0, blocks.rows, step):
        yield a, min(a + step, blocks.rows)


def dense(blocks: GGMLBlocks, dtype: torch.dtype, device) -> Tensor:
    """The (rows, in_features) weight the blocks stand for, in `dtype` on `device` (float32 math, one
    rounding): what gguf's reference dequantization gives. For what stays in float (an embedding)."""
    out = torch.empty(blocks.rows, blocks.in_features, dtype=dtype, device=device)
    for a, b in _chunks(blocks):
        c = decode(blocks.qtype, blocks.data[a:b].to(device))
        w = c.q.float().view(b - a, -1, c.group) * c.scales.unsqueeze(-1)
        if c.mins is not None:
            w += c.mins.unsqueeze(-1)
        out[a:b] = w.view(b - a, -1)
    return out


def transcode_into(storage: dict[str, Tensor], fmt: str, groupsize: int, row0: int, blocks: GGMLBlocks) -> None:
    """Write the blocks' rows into rows [row0, row0 + rows) of fused `storage` (formats.empty_storage of
    `fmt` "int4", "int8" or "int8_asym" at `groupsize`), a chunk of rows at a time on the storage's
    device. `groupsize` must divide the type's own group (fused_format picks one that does)."""
    device, dtype = storage["weight"].device, storage["scales"].dtype
    for a, b in _chunks(blocks):
        c = decode(blocks.qtype, blocks.data[a:b].to(device))
        if c.group % groupsize:
            raise ValueError(f"{blocks.name}'s groups of {c.group} cannot be stored in groups of {groupsize}")
        if fmt == "int8" and c.mins is not None:
            raise ValueError(f"{blocks.name} has minimums: store it as int8_asym, not int8")
        repeat = c.group // groupsize
        scales = c.scales.to(dtype)
        mins = c.mins.to(dtype) if c.mins is not None else None
        if fmt == "int4":
            if NATIVE[blocks.qtype][0] != "int4":
                raise ValueError(f"{blocks.name}'s codes do not fit int4")
            # Unsigned codes q - lo; the shift moves into the minimum, computed from the rounded scale
            # so that (q - lo) s + lo s is exactly q s (Q4_0: m = -8 s).
            words = pack_int4(c.q - c.lo, groupsize)
            mins = (c.lo * scales.float()).to(dtype) if mins is None else mins  # types with minimums have lo 0
        elif fmt in ("int8", "int8_asym"):
            words = pack_int8(c.q, pack_block(fmt, groupsize))
            if fmt == "int8_asym" and mins is None:
                mins = torch.zeros_like(scales)
        else:
            raise ValueError(f"GGUF blocks transcode to int4, int8 or int8_asym, not {fmt}")
        rows = slice(row0 + a, row0 + b)
        storage["weight"][rows].copy_(words)
        storage["scales"][rows].copy_(scales.repeat_interleave(repeat, dim=1))
        if "mins" in storage:
            storage["mins"][rows].copy_(mins.repeat_interleave(repeat, dim=1))
