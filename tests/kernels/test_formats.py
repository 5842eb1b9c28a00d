"""Storage formats of the fused path (pure PyTorch, no triton needed)."""
from __future__ import annotations

import pytest
import torch

from torchchat.kernels import formats
from torchchat.kernels.formats import (
    LinearQuant, dequantize, empty_storage, pack_int4, pack_int8, quantize_into, unpack_int4, unpack_int8,
)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_pack_roundtrip_and_nibble_layout(group):
    gen = torch.Generator().manual_seed(group)
    q = torch.randint(0, 16, (6, 2 * group), generator=gen)
    words = pack_int4(q, group)
    assert words.dtype == torch.int32 and words.shape == (6, 2 * group // 8)
    assert torch.equal(unpack_int4(words, group), q)
    # The documented layout: nibble i of word w in group g is input g*G + i*G/8 + w.
    ws = group // 8
    for g, w, i in [(0, 0, 0), (1, ws - 1, 7), (1, 2, 5), (0, 1, 3)]:
        word = int(words[3, g * ws + w]) & 0xFFFFFFFF
        assert (word >> (4 * i)) & 15 == int(q[3, g * group + i * ws + w])


@pytest.mark.parametrize("block", [32, 128])
def test_int8_pack_roundtrip_and_byte_layout(block):
    gen = torch.Generator().manual_seed(block)
    q = torch.randint(-128, 128, (5, 2 * block), generator=gen)
    words = pack_int8(q, block)
    assert words.shape == (5, 2 * block // 4)
    assert torch.equal(unpack_int8(words, block), q)
    wb = block // 4
    for blk, w, j in [(0, 0, 0), (1, wb - 1, 3), (1, 3, 2)]:
        byte = (int(words[2, blk * wb + w]) >> (8 * j)) & 255
        assert byte == int(q[2, blk * block + j * wb + w]) & 255


@pytest.mark.parametrize("kind,group", [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantization_error_within_half_step(kind, group, dtype):
    gen = torch.Generator().manual_seed(0)
    n, k = 40, 256
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
    st = empty_storage(kind, n, k, group, dtype, "cpu")
    quantize_into(st, kind, group, 0, w)
    deq = dequantize(kind, group, st["weight"], st.get("scales"), st.get("mins"), torch.float32)
    g = k if group == 0 else group
    step = st["scales"].float().repeat_interleave(g, dim=1)
    err = (deq - w.float()).abs()
    # Half a quantization step, plus the model-dtype rounding of the dequantized value's parts.
    slack = 0.0 if dtype == torch.float32 else 2 ** -8 * w.float().abs().amax()
    assert bool((err <= step / 2 + 1e-6 + slack).all())
    if kind == "int4":
        assert int(unpack_int4(st["weight"], group).max()) <= 15


def test_quantize_in_chunks_equals_one_shot(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(37, 64, generator=gen)
    whole = empty_storage("int4", 37, 64, 32, torch.float32, "cpu")
    quantize_into(whole, "int4", 32, 0, w)
    monkeypatch.setattr(formats, "_CHUNK_ELEMENTS", 5 * 64)  # 5 rows at a time
    parts = empty_storage("int4", 37, 64, 32, torch.float32, "cpu")
    quantize_into(parts, "int4", 32, 0, w[:20])
    quantize_into(parts, "int4", 32, 20, w[20:])
    for name in whole:
        assert torch.equal(whole[name], parts[name])


def test_linear_quant_checks_groups():
    assert LinearQuant("int4", 128).fits(4096) and not LinearQuant("int4", 32).fits(172)
    assert LinearQuant("int8", 0).fits(11008) and not LinearQuant("int8", 0).fits(172)
    with pytest.raises(ValueError):
        LinearQuant("int4", 0)
    with pytest.raises(ValueError):
        LinearQuant("int3", 32)
