"""Weight formats of the fused CUDA path, with their reference math in plain PyTorch.

A fused linear stores its weight (out_features N, in_features K) in one of three formats:

- "float": the model dtype, (N, K), row-major.
- "int8": symmetric, int8 values q packed four to an int32 word, (N, K // 4), and scales (N, K // G)
  in the model dtype; w = q * s. G = groupsize, or K for one scale per output channel (groupsize 0).
  Within each block of B inputs (B = G, or 128 per channel), byte j of word w holds input j B/4 + w.
- "int4": asymmetric, 4-bit values q in [0, 15] with scales and minimums (N, K // G) in the model
  dtype; w = q * s + m. The values are packed eight to an int32 word, (N, K // 8). Within each group
  of G inputs, word w (0 <= w < G/8) holds inputs w, w + G/8, ..., w + 7 G/8 in its nibbles 0..7
  (nibble i = bits 4i..4i+3). The GEMV kernel then unpacks field i of a whole tile of words at once
  and meets a contiguous slice of the input vector, so no register shuffles are needed.
- "int8_asym": int8 with a minimum per group as well, w = q * s + m, stored as "int8" plus mins
  (N, K // G). No quantizer makes it: it holds GGUF types whose blocks have minimums (Q5_1, Q5_K, and
  Q4_1/Q4_K stacked beside an int8 type), transcoded by gguf_transcode.py. Groups of 16 (Q6_K's
  sub-blocks) are allowed for the transcoded int8 formats, besides the groupsizes of LinearQuant.

Scales and minimums are rounded to the model dtype before the values are chosen, so the stored
(q, s, m) reproduce the dequantized weight exactly as `dequantize` computes it. (Transcoded GGUF
blocks keep the file's float16 scales in a 16-bit model: the kernels read scales of any float dtype.)

Everything here runs on any device and works chunk by chunk, so quantizing a matrix needs little
memory beyond its packed result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FORMATS = ("float", "int8", "int8_asym", "int4")
INT4_GROUPSIZES = (32, 64, 128, 256)
INT8_GROUPSIZES = (0, 32, 64, 128, 256)
INT8_ROW_BLOCK = 128  # packing block of per-channel int8 (rows must be a multiple of it)
# Weights quantized at a time: bounds the temporaries (float32 and int64 copies) to about 100 MB.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LinearQuant:
    """How the fused path stores linear weights: kind "int8" (groupsize 0 = per channel) or "int4"."""

    kind: str
    groupsize: int

    def __post_init__(self) -> None:
        valid = INT8_GROUPSIZES if self.kind == "int8" else INT4_GROUPSIZES if self.kind == "int4" else None
        if valid is None or self.groupsize not in valid:
            raise ValueError(f"unsupported fused quantization {self.kind} groupsize {self.groupsize}")

    def fits(self, in_features: int) -> bool:
        """Whether rows of this length can take the format (the packing block must divide the row)."""
        return in_features % (self.groupsize or INT8_ROW_BLOCK) == 0


def group_of(fmt: str, groupsize: int, in_features: int) -> int:
    """Inputs per scale: int8 groupsize 0 means one group spanning the whole row."""
    return in_features if fmt == "int8" and groupsize == 0 else groupsize


def pack_block(fmt: str, groupsize: int) -> int:
    """Inputs per packing block of an integer format (see the module docstring)."""
    return groupsize or INT8_ROW_BLOCK


def empty_storage(fmt: str, n: int, k: int, groupsize: int, dtype: torch.dtype, device,
                  scale_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Uninitialised storage for an (n, k) weight: {"weight", "scales"?, "mins"?}. Scales and minimums
    are in `scale_dtype` (default: the model dtype `dtype`; transcoded GGUF blocks keep float16's)."""
    if fmt == "float":
        return {"weight": torch.empty(n, k, dtype=dtype, device=device)}
    groups = k // group_of(fmt, groupsize, k)
    sdt = scale_dtype or dtype
    if fmt in ("int8", "int8_asym"):
        storage = {
            "weight": torch.empty(n, k // 4, dtype=torch.int32, device=device),
            "scales": torch.empty(n, groups, dtype=sdt, device=device),
        }
        if fmt == "int8_asym":
            storage["mins"] = torch.empty(n, groups, dtype=sdt, device=device)
        return storage
    return {
        "weight": torch.empty(n, k // 8, dtype=torch.int32, device=device),
        "scales": torch.empty(n, groups, dtype=sdt, device=device),
        "mins": torch.empty(n, groups, dtype=sdt, device=device),
    }


def _quantize_int8(w: Tensor, group: int, block: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, k = w.shape
    wf = w.float().view(n, k // group, group)
    scales = (wf.abs().amax(-1) / 127.0).clamp(min=1e-10).to(dtype)
    q = torch.round(wf / scales.float().unsqueeze(-1)).clamp_(-127, 127)
    return pack_int8(q.view(n, k), block), scales


def _quantize_int4(w: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    n, k = w.shape
    wf = w.float().view(n, k // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-10).to(dtype)
    mins = lo.to(dtype)
    q = torch.round((wf - mins.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)).clamp_(0, 15)
    return pack_int4(q.to(torch.int64).view(n, k), group), scales, mins


def _pack(fields: Tensor, block: int, bits: int) -> Tensor:
    """(N, K) unsigned fields of `bits` bits -> (N, K * bits // 32) int32 words: in each block of
    `block` inputs, field i of word w is input i * (block * bits // 32) + w."""
    n, k = fields.shape
    per_word = 32 // bits
    f = fields.to(torch.int64).view(n, k // block, per_word, block // per_word)
    shifts = (bits * torch.arange(per_word, device=f.device, dtype=torch.int64)).view(1, 1, per_word, 1)
    words = (f << shifts).sum(dim=2)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32).view(n, k // per_word)


def _unpack(words: Tensor, block: int, bits: int) -> Tensor:
    """Inverse of `_pack`: (N, K * bits // 32) int32 -> (N, K) int64 unsigned fields."""
    n, kw = words.shape
    per_word = 32 // bits
    w = words.to(torch.int64).view(n, kw * per_word // block, 1, block // per_word)
    shifts = (bits * torch.arange(per_word, device=words.device, dtype=torch.int64)).view(1, 1, per_word, 1)
    return ((w >> shifts) & ((1 << bits) - 1)).view(n, kw * per_word)


def pack_int4(q: Tensor, group: int) -> Tensor:
    """q: (N, K) integers in [0, 15] -> (N, K // 8) int32 words in the layout described above."""
    return _pack(q, group, 4)


def unpack_int4(words: Tensor, group: int) -> Tensor:
    """Inverse of `pack_int4`: (N, K // 8) int32 -> (N, K) int64 in [0, 15]."""
    return _unpack(words, group, 4)


def pack_int8(q: Tensor, block: int) -> Tensor:
    """q: (N, K) integers in [-128, 127] -> (N, K // 4) int32 words (bytes in two's complement)."""
    return _pack(q.to(torch.int64) & 255, block, 8)


def unpack_int8(words: Tensor, block: int) -> Tensor:
    """Inverse of `pack_int8`: (N, K // 4) int32 -> (N, K) int64 in [-128, 127]."""
    u = _unpack(words, block, 8)
    return torch.where(u >= 128, u - 256, u)


def quantize_into(storage: dict[str, Tensor], fmt: str, groupsize: int, row0: int, w: Tensor,
                  col_scale: Tensor | None = None) -> None:
    """Write weight rows `w` (r, K) into rows [row0, row0 + r) of `storage`, quantizing on w's device
    a chunk of rows at a time. `col_scale` (K,): store w * col_scale (each input's column scaled)."""
    r, k = w.shape
    group = group_of(fmt, groupsize, k) if fmt != "float" else k
    step = max(1, _CHUNK_ELEMENTS // k)
    for a in range(0, r, step):
        b = min(a + step, r)
        rows = slice(row0 + a, row0 + b)
        part = w[a:b] if col_scale is None else w[a:b].float() * col_scale.float()
        if fmt == "float":
            storage["weight"][rows].copy_(part)
        elif fmt == "int8_asym":
            raise ValueError("int8_asym is only made by transcoding GGUF blocks (gguf_transcode.py)")
        elif fmt == "int8":
            q, s = _quantize_int8(part, group, pack_block(fmt, groupsize), storage["scales"].dtype)
            storage["weight"][rows].copy_(q)
            storage["scales"][rows].copy_(s)
        else:
            q, s, m = _quantize_int4(part, group, storage["scales"].dtype)
            storage["weight"][rows].copy_(q)
            storage["scales"][rows].copy_(s)
            storage["mins"][rows].copy_(m)


def dequantize(fmt: str, groupsize: int, weight: Tensor, scales: Tensor | None, mins: Tensor | None,
               dtype: torch.dtype) -> Tensor:
    """The (N, K) weight a stored format stands for, in `dtype` (float32 math, one rounding)."""
    if fmt == "float":
        return weight.to(dtype)
    n = weight.shape[0]
    if fmt in ("int8", "int8_asym"):
        k = weight.shape[1] * 4
        group = group_of(fmt, groupsize, k)
        q = unpack_int8(weight, pack_block(fmt, groupsize)).float()
        wf = q.view(n, k // group, group) * scales.float().unsqueeze(-1)
        if fmt == "int8_asym":
            wf = wf + mins.float().unsqueeze(-1)
        return wf.view(n, k).to(dtype)
    k = weight.shape[1] * 8
    q = unpack_int4(weight, groupsize).float().view(n, k // groupsize, groupsize)
    wf = q * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)
    return wf.view(n, k).to(dtype)
