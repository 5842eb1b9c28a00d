"""GGUF blocks transcoded into the fused formats (torchchat/kernels/gguf_transcode.py): the stored
integers and scales, dequantized with formats.py's reference `dequantize`, are the gguf package's own
dequantization of the same bytes (exactly, with float32 scales), and a model dtype of bf16/fp16 only
rounds the scales and minimums; rows land where they belong; the GEMV (Triton's interpreter on a CPU)
multiplies them as the dequantized matrix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.checkpoint.gguf_build import encode
from torchchat.kernels.cpu.formats import NAMES, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from torchchat.kernels.formats import dequantize, empty_storage
from torchchat.kernels.gguf_transcode import (
    NATIVE, GGMLBlocks, decode, dense, fused_format, scale_dtype, transcode_into,
)

TYPES = [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K]
IDS = [NAMES[q] for q in TYPES]


def _blocks(qtype: int, n: int = 24, k: int = 512, seed: int = 0) -> tuple[GGMLBlocks, torch.Tensor]:
    """Random weights written as `qtype` blocks, and gguf's float32 dequantization of those bytes."""
    from gguf import GGMLQuantizationType, quants

    w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.05).astype(np.float32)
    w[0, :40] += 0.3  # a group that is all positive, one whose minimum matters
    raw = np.ascontiguousarray(np.asarray(encode(w, NAMES[qtype])).view(np.uint8).reshape(n, -1))
    ref = quants.dequantize(raw, GGMLQuantizationType[NAMES[qtype]]).reshape(n, k)
    return GGMLBlocks(torch.from_numpy(raw), qtype), torch.from_numpy(np.ascontiguousarray(ref))


def _transcode(blocks: GGMLBlocks, fmt: str, groupsize: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    st = empty_storage(fmt, blocks.rows, blocks.in_features, groupsize, dtype, "cpu")
    transcode_into(st, fmt, groupsize, 0, blocks)
    return st


def _dequant(st, fmt, groupsize, dtype=torch.float32):
    return dequantize(fmt, groupsize, st["weight"], st.get("scales"), st.get("mins"), dtype)


def _formats(qtype: int) -> list[tuple[str, int]]:
    """The type's own fused format and the one a stack beside Q6_K takes (int8, groups of 16)."""
    return sorted({NATIVE[qtype], fused_format([qtype, Q6_K])})


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_float32_transcoding_is_gguf_dequantization(qtype):
    blocks, ref = _blocks(qtype)
    torch.testing.assert_close(dense(blocks, torch.float32, "cpu"), ref, rtol=1e-6, atol=1e-9)
    for fmt, groupsize in _formats(qtype):
        st = _transcode(blocks, fmt, groupsize, torch.float32)
        assert st["weight"].dtype == torch.int32
        assert st["weight"].shape == (24, 512 // (8 if fmt == "int4" else 4))
        assert st["scales"].shape == (24, 512 // groupsize)
        assert ("mins" in st) == (fmt in ("int4", "int8_asym"))
        torch.testing.assert_close(_dequant(st, fmt, groupsize), ref, rtol=1e-6, atol=1e-9)


def test_scales_keep_the_files_float16_in_16_bit_models():
    assert scale_dtype(torch.bfloat16) == scale_dtype(torch.float16) == torch.float16
    assert scale_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_scales_only_round_the_scales(qtype, dtype):
    """The codes are the same words; scales and minimums are the float32 ones rounded once to dtype
    (float16 is what a 16-bit model stores; bfloat16 scales work the same, one more rounding)."""
    blocks, ref = _blocks(qtype)
    for fmt, groupsize in _formats(qtype):
        exact = _transcode(blocks, fmt, groupsize, torch.float32)
        st = _transcode(blocks, fmt, groupsize, dtype)
        assert torch.equal(st["weight"], exact["weight"])
        for key in ("scales", "mins"):
            if key in st:
                assert st[key].dtype == dtype and torch.equal(st[key], exact[key].to(dtype)), key
        # So the weight moves by at most the rounding of its scale and minimum (2^-9 relative in bf16).
        err = (_dequant(st, fmt, groupsize) - ref).abs().max().item()
        assert err <= 2 ** -8 * ref.abs().max().item()
    if dtype == torch.float16 and qtype not in (Q4_K, Q5_K, Q6_K):  # d is an fp16 already: exact
        st = _transcode(blocks, *NATIVE[qtype], dtype)
        torch.testing.assert_close(_dequant(st, *NATIVE[qtype]), ref, rtol=1e-6, atol=1e-9)


def test_rows_go_where_they_belong_and_mixed_stacks_are_exact():
    """A q|k|v-like stack of Q4_K, Q4_K and Q6_K rows in one int8_asym g16 matrix, written part by part
    at row offsets, in more than one chunk: each part's rows dequantize to that part's GGUF rows."""
    import torchchat.kernels.gguf_transcode as tc

    parts = [_blocks(Q4_K, 32, 256, seed=1), _blocks(Q4_K, 16, 256, seed=2), _blocks(Q6_K, 16, 256, seed=3)]
    fmt, groupsize = fused_format([b.qtype for b, _ in parts])
    assert (fmt, groupsize) == ("int8_asym", 16)
    st = empty_storage(fmt, 64, 256, groupsize, torch.float32, "cpu")
    old = tc._CHUNK_ELEMENTS
    tc._CHUNK_ELEMENTS = 256 * 5  # 5 rows a chunk: parts end mid-chunk
    try:
        row0 = 0
        for b, _ in parts:
            transcode_into(st, fmt, groupsize, row0, b)
            row0 += b.rows
    finally:
        tc._CHUNK_ELEMENTS = old
    torch.testing.assert_close(_dequant(st, fmt, groupsize), torch.cat([r for _, r in parts]), rtol=1e-6, atol=1e-9)


def test_fused_format_choices():
    assert fused_format([Q4_K, Q4_K]) == ("int4", 32)
    assert fused_format([Q4_0, Q4_K]) == ("int4", 32)
    assert fused_format([Q5_0, Q5_0, Q8_0]) == ("int8", 32)  # s15m Q4_K_M: Q5_0 q/k beside a Q8_0 v
    assert fused_format([Q5_1, Q8_0]) == ("int8_asym", 32)
    assert fused_format([Q4_0, Q6_K]) == ("int8", 16)
    assert fused_format([Q4_K, Q6_K]) == ("int8_asym", 16)
    assert fused_format([Q6_K]) == ("int8", 16)


def test_refusals_name_the_problem():
    blocks, _ = _blocks(Q4_K, 4, 256)
    with pytest.raises(ValueError, match="int8_asym"):
        _transcode(blocks, "int8", 32, torch.float32)  # Q4_K has minimums
    with pytest.raises(ValueError, match="groups of 32"):
        _transcode(_blocks(Q6_K, 4, 256)[0], "int8", 32, torch.float32)  # 16-value sub-blocks
    with pytest.raises(ValueError, match="int4"):
        _transcode(_blocks(Q5_0, 4, 256)[0], "int4", 32, torch.float32)  # 5-bit codes
    with pytest.raises(ValueError, match="transcodable"):
        decode(0, torch.zeros(1, 4, dtype=torch.uint8))


@pytest.mark.parametrize("k", [256, 768])  # 768: the second 512-input tile is a partial one
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_gemv_on_transcoded_weights(qtype, k, device):
    """The fused GEMV (norm prologue, swiglu epilogue) on the transcoded storage against F.linear on its
    dequantization. On a CPU it runs in Triton's interpreter."""
    pytest.importorskip("triton")
    from torchchat.kernels.gemv import gemv

    blocks, _ = _blocks(qtype, 32, k)
    gen = torch.Generator().manual_seed(qtype)
    x = torch.randn(k, generator=gen).to(device)
    g = (torch.rand(k, generator=gen) + 0.5).to(device)
    rms = torch.rsqrt(x.pow(2).mean() + 1e-5)
    for fmt, groupsize in _formats(qtype):
        st = {k: v.to(device) for k, v in _transcode(blocks, fmt, groupsize, torch.float32).items()}
        w = _dequant(st, fmt, groupsize)
        args = (fmt, groupsize, st["weight"], st["scales"], st.get("mins"))
        torch.testing.assert_close(gemv(x, *args), F.linear(x, w), rtol=1e-4, atol=1e-5)
        fused = gemv(x, *args, norm_weight=g, eps=1e-5, swiglu=True)
        h = F.linear(x * rms * g, w)
        torch.testing.assert_close(fused, F.silu(h[:16]) * h[16:], rtol=1e-4, atol=1e-5)
