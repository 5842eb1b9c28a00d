"""The fused GEMV kernel against PyTorch on the dequantized weight (float32: tight; bf16: one rounding)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.kernels.numerics import rel_err  # noqa: E402
from torchchat.kernels.formats import dequantize, empty_storage, quantize_into  # noqa: E402
from torchchat.kernels.gemv import GemvConfig, gemv  # noqa: E402
from torchchat.model.transformer import RMSNorm  # noqa: E402


def _reference(x, w, norm=None, eps=1e-5, swiglu=False, residual=None, res_scale=1.0):
    """The unfused modules' math: RMSNorm module, F.linear per weight, silu * up, residual add."""
    if norm is not None:
        rms = RMSNorm(x.numel(), eps).to(device=x.device, dtype=x.dtype)
        rms.weight.data.copy_(norm)
        x = rms(x)
    if swiglu:
        n = w.shape[0] // 2
        y = F.silu(F.linear(x, w[:n])) * F.linear(x, w[n:])
    else:
        y = F.linear(x, w)
    return residual + res_scale * y if residual is not None else y


def _stored(fmt, group, w, dtype):
    st = empty_storage(fmt, w.shape[0], w.shape[1], group, dtype, w.device)
    quantize_into(st, fmt, group, 0, w)
    return st["weight"], st.get("scales"), st.get("mins")


def _dequant(fmt, group, w, dtype):
    return dequantize(fmt, group, *_stored(fmt, group, w, dtype), dtype)


CASES = [("float", 0), ("int8", 0), ("int8", 32), ("int4", 32), ("int4", 64)]


@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("n,k", [(40, 128), (24, 172)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_fused_prologue_epilogue(device, fmt, group, n, k, dtype):
    if fmt != "float" and k % (group or 128):
        pytest.skip("the packing block does not divide the row")
    gen = torch.Generator().manual_seed(n * k + group)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype).to(device)
    st = empty_storage(fmt, n, k, group, dtype, device)
    quantize_into(st, fmt, group, 0, w)
    wd = dequantize(fmt, group, st["weight"], st.get("scales"), st.get("mins"), dtype)
    x = torch.randn(k, generator=gen).to(dtype).to(device)
    g = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(device)
    res = torch.randn(n // 2, generator=gen).to(dtype).to(device)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    args = (fmt, group, st["weight"], st.get("scales"), st.get("mins"))

    plain = gemv(x, *args)
    assert plain.dtype == dtype and rel_err(plain, _reference(x, wd)) < tol
    fused = gemv(x, *args, norm_weight=g, eps=1e-5, swiglu=True, residual=res, res_scale=0.5)
    expect = _reference(x, wd, norm=g, swiglu=True, residual=res, res_scale=0.5)
    assert fused.shape == (n // 2,) and rel_err(fused, expect) < tol
    folded = gemv(x, fmt, group, *_stored(fmt, group, w.float() * g.float(), dtype), rms_only=True, eps=1e-5)
    rms = torch.rsqrt(x.float().pow(2).mean() + 1e-5)
    assert rel_err(folded, F.linear(x.float() * rms, _dequant(fmt, group, w.float() * g.float(), dtype).float())) < tol
    logits = gemv(x, *args, out_dtype=torch.float32)
    assert logits.dtype == torch.float32 and torch.equal(logits.to(dtype), logits.to(dtype).float().to(dtype))


@pytest.mark.parametrize("block_n,block_k", [(4, 32), (16, 64), (8, 256)])
def test_gemv_any_tile_covers_every_row(device, block_n, block_k):
    """Odd sizes against several tiles: every output row written, masked edges correct."""
    gen = torch.Generator().manual_seed(block_n)
    n, k = 45, 96
    w = torch.randn(n, k, generator=gen).to(device)
    x = torch.randn(k, generator=gen).to(device)
    cfg = GemvConfig(block_n=block_n, block_k=block_k)
    y = gemv(x, "float", 0, w, config=cfg)
    assert rel_err(y, w.double() @ x.double()) < 1e-6
    st = empty_storage("int4", n, k, 32, torch.float32, device)
    quantize_into(st, "int4", 32, 0, w)
    wd = dequantize("int4", 32, st["weight"], st["scales"], st["mins"], torch.float32)
    y4 = gemv(x, "int4", 32, st["weight"], st["scales"], st["mins"], config=GemvConfig(block_n, max(block_k, 32)))
    assert rel_err(y4, wd.double() @ x.double()) < 1e-6


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int8", 0), ("int8", 32), ("int8_asym", 32)])
def test_gemv_pipelined_loop_matches_the_prefetching_one(device, fmt, group):
    """Tiles with num_stages > 1 take the loop without the hand prefetch (Triton pipelines its loads):
    same products, with the fused RMSNorm scaling and residual, over a ragged last tile."""
    gen = torch.Generator().manual_seed(7)
    n, k = 40, 384  # 384 = 3 tiles of 128 (or 1.5 of 256): the last tile partly masked
    w = torch.randn(n, k, generator=gen).to(device)
    x = torch.randn(k, generator=gen).to(device)
    res = torch.randn(n, generator=gen).to(device)
    q, s, m = _stored_any(fmt, group, w, torch.float32, gen)
    for cfg in (GemvConfig(8, 128, 4, 1), GemvConfig(8, 128, 4, 3), GemvConfig(16, 256, 4, 4)):
        one = gemv(x, fmt, group, q, s, m, config=GemvConfig(cfg.block_n, cfg.block_k), rms_only=True, eps=1e-5,
                   residual=res, res_scale=0.5)
        piped = gemv(x, fmt, group, q, s, m, config=cfg, rms_only=True, eps=1e-5, residual=res, res_scale=0.5)
        assert rel_err(piped, one) < 1e-6


def _stored_any(fmt, group, w, dtype, gen):
    """Storage of w in `fmt`; int8_asym (no quantizer makes it) is int8 plus random minimums."""
    if fmt != "int8_asym":
        return _stored(fmt, group, w, dtype)
    q, s, _ = _stored("int8", group, w, dtype)
    mins = (torch.randn(s.shape, generator=gen) * 0.01).to(dtype).to(w.device)
    return q, s, mins


ROW_CASES = CASES + [("int8_asym", 32), ("int8_asym", 16), ("int4", 128)]  # 16: GGUF Q6_K sub-blocks


@pytest.mark.parametrize("fmt,group", ROW_CASES)
@pytest.mark.parametrize("m", [2, 3, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_rows_matches_the_reference_per_row(device, fmt, group, m, dtype):
    """The small-batch kernel: every row as the modules compute it, every prologue and epilogue."""
    from torchchat.kernels.gemv_rows import gemv_rows

    if dtype == torch.bfloat16 and m in (3, 8):
        pytest.skip("bf16 rounding is covered by m 2 and 16; the masking by float32")
    n, k = 48, 256
    gen = torch.Generator().manual_seed(n * m + group)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype).to(device)
    stored = _stored_any(fmt, group, w, dtype, gen)
    wd = dequantize(fmt, group, *stored, dtype)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    g = (torch.rand(k, generator=gen) + 0.5).to(dtype).to(device)
    res = torch.randn(m, n // 2, generator=gen).to(dtype).to(device)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    args = (fmt, group, *stored)

    plain = gemv_rows(x, *args)
    assert plain.shape == (m, n) and plain.dtype == dtype
    assert rel_err(plain, torch.stack([_reference(r, wd) for r in x])) < tol
    fused = gemv_rows(x, *args, norm_weight=g, eps=1e-5, swiglu=True, residual=res, res_scale=0.5)
    expect = torch.stack([_reference(x[i], wd, norm=g, swiglu=True, residual=res[i], res_scale=0.5) for i in range(m)])
    assert fused.shape == (m, n // 2) and rel_err(fused, expect) < tol
    rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    folded = gemv_rows(x, *args, rms_only=True, eps=1e-5)
    assert rel_err(folded, F.linear(x.float() * rms, wd.float())) < tol
    logits = gemv_rows(x, *args, out_dtype=torch.float32)
    assert logits.dtype == torch.float32 and rel_err(logits, plain) < tol
    # Row i alone gives row i of the batch: rows do not leak into each other. (Through the same kernel:
    # int4 takes the CUDA-core kernel up to 8 rows and tensor cores beyond, which round differently.)
    from torchchat.kernels.gemv_rows import rows_kernel

    alone = gemv_rows(x[1:2].contiguous(), *args, kernel=rows_kernel(fmt, m))
    assert rel_err(alone, plain[1:2]) < 1e-6


def test_gemv_rows_more_than_one_block_of_rows(device):
    """20 rows: a second program row (rows 16..19, masked past 20) and odd output/input sizes."""
    from torchchat.kernels.gemv import GemvConfig
    from torchchat.kernels.gemv_rows import gemv_rows

    gen = torch.Generator().manual_seed(3)
    n, k = 45, 96
    w = torch.randn(n, k, generator=gen).to(device)
    x = torch.randn(20, k, generator=gen).to(device)
    y = gemv_rows(x, "float", 0, w, config=GemvConfig(block_n=16, block_k=32))
    assert rel_err(y, x.double() @ w.double().T) < 1e-6


def test_gemv_rows_tiles_follow_the_environment(monkeypatch):
    from torchchat.kernels.gemv_rows import pick_rows_config

    monkeypatch.delenv("TORCHCHAT_GEMV_ROWS_TILES", raising=False)
    assert pick_rows_config("int4", 4096, 4096, 128).block_n == 64  # the H100 sweep's choice
    monkeypatch.setenv("TORCHCHAT_GEMV_ROWS_TILES", '{"int4": [32, 1024, 4, 2]}')
    cfg = pick_rows_config("int4", 4096, 4096, 128)
    assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages) == (32, 1024, 4, 2)
    assert pick_rows_config("int4", 4096, 4096, 2048).block_k == 2048  # still a multiple of the group
    assert pick_rows_config("int8", 40, 64, 32).block_k == 64  # 16 columns per byte field at least


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("variant,stages", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_gemv_int4_variants(device, group, variant, stages):
    """The vector-tile int4 loops (GemvConfig.variant): variant 1 is the float32 math of variant 0 summed
    in another order; variant 2 dequantizes and multiplies in float16 pairs (about 2e-3 relative error:
    gemv.py says where it rounds). Fused RMSNorm scaling, SwiGLU and residual, over a ragged last tile."""
    gen = torch.Generator().manual_seed(group + variant)
    n, k = 40, 384  # block_k 256: the second tile is half masked
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device)
    x = torch.randn(k, generator=gen).to(device)
    res = torch.randn(n // 2, generator=gen).to(device)
    q, s, m = _stored("int4", group, w, torch.float32)
    wd = dequantize("int4", group, q, s, m, torch.float32)
    cfg = GemvConfig(16, max(256, group), 4, stages, variant)
    tol = 1e-6 if variant == 1 else 4e-3
    base = GemvConfig(16, max(256, group), 4)
    y = gemv(x, "int4", group, q, s, m, config=cfg)
    assert rel_err(y, wd.double() @ x.double()) < (1e-5 if variant == 1 else tol)
    fused = dict(rms_only=True, eps=1e-5, swiglu=True, residual=res, res_scale=0.5)
    assert rel_err(gemv(x, "int4", group, q, s, m, config=cfg, **fused),
                   gemv(x, "int4", group, q, s, m, config=base, **fused)) < tol


def test_gemv_int4_variant_bf16_matches_the_modules(device):
    """Variant 2 in a bfloat16 model: within the tolerance the other formats meet against the modules."""
    gen = torch.Generator().manual_seed(5)
    n, k = 24, 256
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16).to(device)
    x = torch.randn(k, generator=gen).to(torch.bfloat16).to(device)
    st = _stored("int4", 64, w, torch.bfloat16)
    wd = dequantize("int4", 64, *st, torch.bfloat16)
    y = gemv(x, "int4", 64, *st, config=GemvConfig(8, 256, 4, 1, 2))
    assert y.dtype == torch.bfloat16 and rel_err(y, _reference(x, wd)) < 1.5e-2


def test_gemv_tiles_take_the_variant_field(monkeypatch):
    """TORCHCHAT_GEMV_TILES' fifth field picks the int4 loop variant; without it, variant 0."""
    from torchchat.kernels.gemv import pick_config

    monkeypatch.setenv("TORCHCHAT_GEMV_TILES", '{"int4": [32, 512, 4, 1, 2], "int4:small": [16, 1024, 8]}')
    assert pick_config("int4", 12288, 4096, 128) == GemvConfig(32, 512, 4, 1, 2)
    assert pick_config("int4", 4096, 4096, 128).variant == 0


def _simulate_ptx(text: str, operands: dict[str, int]) -> float:
    """Run the straight-line PTX of gemv._dot4_f16x2_asm on the CPU: the few instructions it uses, with
    float16 halves rounded as the GPU rounds them (a float64 FMA is exact for float16 operands)."""
    import numpy as np

    def half(bits: int) -> float:
        return float(np.array([bits & 0xFFFF], np.uint16).view(np.float16)[0])

    def bits16(v: float) -> int:
        return int(np.array([v], np.float16).view(np.uint16)[0])

    def pair(fn, *regs):
        lo = fn(*(half(r) for r in regs))
        hi = fn(*(half(r >> 16) for r in regs))
        return bits16(lo) | bits16(hi) << 16

    reg = dict(operands)
    val = lambda t: reg[t] if t in reg else int(t, 0)  # noqa: E731
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32" and args.startswith("{"):
            lo, hi, src = (a.strip(" {}") for a in args.replace("}", ",").split(",") if a.strip(" {}"))
            reg[lo], reg[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        d, *a = (t.strip() for t in args.split(","))
        if op == "mov.b32":
            reg[d] = val(a[0])
        elif op == "lop3.b32":
            assert a[3] == "0xEA"  # (a & b) | c
            reg[d] = (val(a[0]) & val(a[1])) | val(a[2])
        elif op == "shr.b32":
            reg[d] = (val(a[0]) & 0xFFFFFFFF) >> int(a[1])
        elif op == "fma.rn.f16x2":
            reg[d] = pair(lambda x, y, z: x * y + z, val(a[0]), val(a[1]), val(a[2]))
        elif op == "mul.rn.f16x2":
            reg[d] = pair(lambda x, y: x * y, val(a[0]), val(a[1]))
        elif op == "cvt.f32.f16":
            reg[d] = half(val(a[0]))
        elif op == "add.f32":
            reg[d] = float(np.float32(reg[a[0]]) + np.float32(reg[a[1]]))
        else:
            raise AssertionError(f"the simulator does not know {op}")
    return reg["$0"]


def test_dot4_ptx_computes_the_nibble_dot_product():
    """The packed-float16 PTX of int4 variant 2 (which only a GPU runs), simulated instruction by
    instruction: four words' nibbles times their inputs, q s rounded to float16, the nibble pairing
    and the x / 16 of odd pairs as gemv._int4_step_vec feeds them."""
    import numpy as np

    from torchchat.kernels.gemv import _dot4_f16x2_asm

    rng = np.random.default_rng(0)
    bits16 = lambda v: int(np.array([v], np.float16).view(np.uint16)[0])  # noqa: E731
    for _ in range(20):
        words = rng.integers(0, 2**32, 4, dtype=np.uint64)
        x = rng.standard_normal((4, 8)) * 3  # x[v, i]: the input of nibble i of word v
        s, m = float(np.float16(rng.uniform(1e-3, 2e-2))), 0.0
        ops = {f"${1 + v}": int(words[v]) for v in range(4)}
        for v in range(4):
            for j in range(4):
                f = 1 / 16 if j % 2 else 1.0
                ops[f"${5 + 4 * v + j}"] = bits16(x[v, j] * f) | bits16(x[v, j + 4] * f) << 16
        ops["$21"] = bits16(s) | bits16(s) << 16
        ops["$22"] = bits16(-1024 * s) | bits16(-1024 * s) << 16
        got = _simulate_ptx(_dot4_f16x2_asm(), ops)
        q = np.array([[(int(words[v]) >> 4 * i) & 15 for i in range(8)] for v in range(4)])
        want = float((q * s * x).sum()) + m
        assert abs(got - want) < 5e-3 * float(np.abs(q * s * x).sum()), (got, want)
