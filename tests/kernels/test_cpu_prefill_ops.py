"""torchchat's fused CPU operators for the eager forward (torchchat_cpu::rms_norm, rope, kv_update,
silu_mul; csrc/prefill_ops.cpp) against the PyTorch code they replace (torchchat/model).

Tolerance. The operators round to the activations' dtype where the PyTorch code does, so the rotations
and cache writes match exactly (fp32 within 1e-6 relative, to allow a fused multiply-add where a
compiler contracts one). RMSNorm sums squares in another order (fp32: 1e-6 relative); SiLU uses its
own exp (relative error ~2e-7): fp32 within 1e-5 relative. In bf16 either may land one bf16 step (2^-8
relative) away from torch's result, where the float values straddle a rounding boundary.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchchat.kernels import cpu
from torchchat.model.kv_cache import KVCache
from torchchat.model.rope import apply_rope, rope_table
from torchchat.model.transformer import RMSNorm

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

BF16_STEP = 2.0**-7  # one bf16 step at the top of a binade, relative: the worst single rounding difference


@pytest.fixture(params=["scalar", None], ids=["baseline-loops", "best"])
def isa(request):
    """The ops' SIMD loops (AVX2+FMA SiLU, F16C conversion) run unless the ISA is capped at scalar."""
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, fp32_rtol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=fp32_rtol, atol=fp32_rtol * want.abs().max().item())
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=BF16_STEP, atol=BF16_STEP * want.abs().max().item())


def _heads(b: int, s: int, h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, S, H, D) with the strides of a q|k|v split: heads contiguous, rows further apart."""
    qkv = torch.randn(b, s, 3 * h * d).to(dtype)
    return qkv[..., h * d : 2 * h * d].view(b, s, h, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128, 288), (2, 3, 7), (1, 1, 64), (5, 4, 2, 48)])
def test_rms_norm_matches_module(dtype, shape):
    norm = RMSNorm(shape[-1], 1e-5).to(dtype)
    norm.weight.data = (1 + 0.3 * torch.randn(shape[-1])).to(dtype)
    x = (3 * torch.randn(shape)).to(dtype)
    with torch.no_grad():
        want = norm(x)
        norm.native_ops = True
        got = norm(x)
        _close(got, want, dtype, 1e-6)
        _close(cpu.rms_norm(x.transpose(-1, -2).contiguous().transpose(-1, -2), norm.weight, 1e-5), want, dtype, 1e-6)


def test_rms_norm_other_weight_dtype_stays_in_pytorch():
    norm = RMSNorm(16, 1e-5)  # fp32 weight, bf16 input: PyTorch promotes, the module keeps its own code
    norm.native_ops = True
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.float32
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        cpu.rms_norm(x, norm.weight, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, s, h, d, rope_dim", [(1, 128, 6, 48, 48), (2, 5, 3, 64, 32), (3, 1, 4, 8, 8), (1, 7, 2, 10, 4)])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_rope_matches_apply_rope(dtype, b, s, h, d, rope_dim, per_row):
    table = rope_table(256, rope_dim, 10000.0)
    if per_row:  # batched serving: each row at its own positions, (B, S)
        pos = torch.stack([torch.arange(s) + 17 * i for i in range(b)])
    else:
        pos = torch.arange(s) + 3
    t = table[pos]
    x = _heads(b, s, h, d, dtype)
    want = torch.cat([apply_rope(x[..., :rope_dim], t), x[..., rope_dim:]], dim=-1)
    got = cpu.rope(x, t, rope_dim)
    assert got.is_contiguous()
    _close(got, want, dtype, 1e-6)
    if dtype == torch.bfloat16:  # one rounding from the same float values: exact
        assert torch.equal(got, want)


@pytest.mark.parametrize("k_dtype, cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                                  (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("b, s, h, d, rope_dim, per_row, row", [
    (1, 128, 6, 48, 48, False, 0),  # stories15M's prefill
    (1, 1, 6, 48, 48, False, 0),  # a decode step
    (2, 5, 2, 64, 32, True, 1),  # batched rows at their own positions, partial rotary, rows [1, 3)
    (3, 4, 1, 8, 0, False, 0),  # a layer without RoPE
])
def test_kv_update_matches_rope_and_cache_update(isa, k_dtype, cache_dtype, b, s, h, d, rope_dim, per_row, row):
    s_max = 160
    pos = torch.stack([torch.arange(s) + 9 * i for i in range(b)]) if per_row else torch.arange(s) + 2
    table = rope_table(s_max, max(rope_dim, 2), 10000.0)[pos][..., : rope_dim // 2, :]
    k, v = _heads(b, s, h, d, k_dtype), _heads(b, s, h, d, k_dtype)
    want_cache, got_cache = (KVCache(row + b + 1, s_max, h, d, cache_dtype) for _ in range(2))
    want_cache.k_cache.normal_(), want_cache.v_cache.normal_()  # old values: they must stay where not written
    got_cache.k_cache.copy_(want_cache.k_cache), got_cache.v_cache.copy_(want_cache.v_cache)
    kr = torch.cat([apply_rope(k[..., :rope_dim], table), k[..., rope_dim:]], dim=-1) if rope_dim else k
    want_k, want_v = want_cache.update(pos, kr.transpose(1, 2), v.transpose(1, 2), row)
    got_k, got_v = got_cache.update_rotated(pos, k, v, table, rope_dim, row)
    assert got_k.data_ptr() == got_cache.k_cache[row].data_ptr() and got_k.shape == want_k.shape
    tol = 1e-6 if cache_dtype == torch.float32 else 0.0
    torch.testing.assert_close(got_cache.v_cache, want_cache.v_cache, rtol=0, atol=0)
    torch.testing.assert_close(got_cache.k_cache, want_cache.k_cache, rtol=tol, atol=tol)


def test_kv_update_rejects_what_it_cannot_write():
    cache = KVCache(1, 8, 2, 16, torch.float32)
    k = torch.randn(1, 3, 2, 16)
    table = rope_table(8, 16, 10000.0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu.kv_update(k, k, table[:3], 16, torch.tensor([6, 7, 8]), cache.k_cache, cache.v_cache)
    with pytest.raises(RuntimeError, match="does not fit the cache"):
        cpu.kv_update(k, k, table[:3], 16, torch.arange(3), cache.k_cache, cache.v_cache, 1)
    with pytest.raises(RuntimeError, match="table"):
        cpu.kv_update(k, k, table[:4], 16, torch.arange(3), cache.k_cache, cache.v_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128, 2 * 768), (3, 5, 2 * 7), (1, 1, 2 * 3), (4, 2 * 1)])
def test_silu_mul_matches_torch(isa, dtype, shape):
    x = (4 * torch.randn(shape)).to(dtype)
    x.view(-1)[:4] = torch.tensor([0.0, -100.0, 100.0, -0.0], dtype=dtype)  # saturated and zero gates
    gate, up = x.chunk(2, dim=-1)
    _close(cpu.silu_mul(x), F.silu(gate) * up, dtype, 1e-5)


def test_fake_kernels_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 5, 3, 8)
        assert cpu.rope(x, torch.empty(5, 4, 2), 8).shape == (2, 5, 3, 8)
        assert cpu.silu_mul(torch.empty(2, 5, 12)).shape == (2, 5, 6)
        assert cpu.rms_norm(torch.empty(2, 5, 12), torch.empty(12), 1e-5).shape == (2, 5, 12)
        cache = torch.empty(1, 3, 16, 8)
        cpu.kv_update(x[:1], x[:1], torch.empty(5, 4, 2), 8, torch.arange(5), cache, cache.clone())
