"""The one-dot int4 tensor-core kernel (gemv_mma.py) against PyTorch on the dequantized weight: both
operand column orders (warpgroup tiles of 4 warps, warp tiles of 1 or 2), every int4 group (group 128
loads the inputs contiguously, the others gather them), every prologue and epilogue, masked input
rows, odd output counts and a last step past the end of the row. float32: tight; bf16: one rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.kernels.numerics import rel_err  # noqa: E402
from tests.kernels.test_gemv import _reference, _stored  # noqa: E402
from torchchat.kernels.formats import dequantize  # noqa: E402
from torchchat.kernels.gemv import GemvConfig  # noqa: E402

# (group, inputs, tile): 384 inputs with steps of 256 leave a half step at the end of each row.
# A 4th tile field: weight steps loaded ahead (640 inputs in 5 steps of 128 with 4 in flight).
CASES = [(128, 384, (64, 256, 4)), (128, 640, (32, 128, 2, 4)), (32, 256, (16, 128, 1, 2)), (64, 384, (64, 256, 4, 2)),
         (256, 512, (16, 256, 1))]


def _case(group, m, n, k, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype).to(device)
    stored = _stored("int4", group, w, dtype)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    return stored, dequantize("int4", group, *stored, dtype), x, gen


@pytest.mark.parametrize("group,k,tile", CASES)
@pytest.mark.parametrize("m", [3, 16])
def test_mma_rows_match_the_reference_per_row(device, group, k, tile, m):
    """float32, 45 outputs of each half (odd: a masked tile edge); m 3 masks 13 of the 16 rows."""
    from torchchat.kernels.gemv_mma import gemv_mma

    n = 45
    stored, wd, x, gen = _case(group, m, 2 * n, k, torch.float32, device, 7 * m + group + k)
    g = (torch.rand(k, generator=gen) + 0.5).to(device)
    res = torch.randn(m, n, generator=gen).to(device)
    args = ("int4", group, *stored)
    cfg = GemvConfig(*tile)

    plain = gemv_mma(x, *args, config=cfg)
    assert plain.shape == (m, 2 * n) and plain.dtype == torch.float32
    assert rel_err(plain, x.double() @ wd.double().T) < 1e-5
    fused = gemv_mma(x, *args, norm_weight=g, eps=1e-5, swiglu=True, residual=res, res_scale=0.5, config=cfg)
    expect = torch.stack([_reference(x[i], wd, norm=g, swiglu=True, residual=res[i], res_scale=0.5) for i in range(m)])
    assert fused.shape == (m, n) and rel_err(fused, expect) < 1e-5
    rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(gemv_mma(x, *args, rms_only=True, eps=1e-5, config=cfg), F.linear(x * rms, wd)) < 1e-5
    # Row i alone gives row i of the batch: rows do not leak into each other.
    assert rel_err(gemv_mma(x[-1:].contiguous(), *args, config=cfg), plain[-1:]) < 1e-6


@pytest.mark.parametrize("tile", [(64, 256, 4), (16, 128, 1)])
def test_mma_rows_bf16_within_a_rounding_of_the_dot_kernel(device, tile):
    """bf16, 8 rows: the weights rounded to bf16 as the dot kernel rounds them, so both agree to the
    summation order; logits rounded to bf16."""
    from torchchat.kernels.gemv_mma import gemv_mma
    from torchchat.kernels.gemv_rows import gemv_rows

    n, k, m = 24, 256, 8
    stored, wd, x, gen = _case(128, m, 2 * n, k, torch.bfloat16, device, 11)
    g = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).to(device)
    res = torch.randn(m, n, generator=gen).to(torch.bfloat16).to(device)
    args = ("int4", 128, *stored)
    extra = dict(norm_weight=g, eps=1e-5, swiglu=True, residual=res, res_scale=0.5)
    fused = gemv_mma(x, *args, config=GemvConfig(*tile), **extra)
    expect = torch.stack([_reference(x[i], wd, norm=g, swiglu=True, residual=res[i], res_scale=0.5) for i in range(m)])
    assert fused.dtype == torch.bfloat16 and rel_err(fused, expect) < 1.5e-2
    assert rel_err(fused, gemv_rows(x, *args, kernel="dot", **extra)) < 1.5e-2
    logits = gemv_mma(x, *args, out_dtype=torch.float32, config=GemvConfig(*tile))
    assert logits.dtype == torch.float32 and torch.equal(logits, logits.to(torch.bfloat16).float())


def test_mma_rows_past_one_block_of_rows(device):
    """20 rows with 16 per program: a second program row (rows 16..19, masked past 20)."""
    from torchchat.kernels.gemv_mma import gemv_mma

    stored, wd, x, _ = _case(128, 20, 45, 256, torch.float32, device, 5)
    y = gemv_mma(x, "int4", 128, *stored, config=GemvConfig(16, 128, 1))
    assert y.shape == (20, 45) and rel_err(y, x.double() @ wd.double().T) < 1e-5


def test_mma_rows_reject_what_they_do_not_take(device):
    from torchchat.kernels.gemv_mma import MmaRowsError, gemv_mma

    with pytest.raises(MmaRowsError, match="int4"):
        gemv_mma(torch.randn(2, 128, device=device), "int8", 0, torch.zeros(16, 32, dtype=torch.int32, device=device))
    stored, _, x, _ = _case(128, 2, 64, 256, torch.float32, device, 1)
    with pytest.raises(MmaRowsError, match="16 per warp"):
        gemv_mma(x, "int4", 128, *stored, config=GemvConfig(32, 256, 4))
    with pytest.raises(MmaRowsError, match="multiple of 128"):
        gemv_mma(x, "int4", 128, *stored, config=GemvConfig(64, 64, 4))
    with pytest.raises(MmaRowsError, match="ahead 1 to 4"):
        gemv_mma(x, "int4", 128, *stored, config=GemvConfig(64, 128, 4, 5))


def test_mma_is_chosen_by_the_environment_for_int4_only(monkeypatch, device):
    from torchchat.kernels import gemv_rows as rows_mod
    from torchchat.kernels.gemv_mma import gemv_mma

    monkeypatch.setenv("TORCHCHAT_ROWS_KERNEL", "mma")
    assert rows_mod.rows_kernel("int4", 8) == "mma"
    assert {rows_mod.rows_kernel(f, 8) for f in ("float", "int8", "int8_asym")} == {"dot"}
    stored, _, x, _ = _case(128, 2, 16, 128, torch.float32, device, 2)
    assert torch.equal(rows_mod.gemv_rows(x, "int4", 128, *stored), gemv_mma(x, "int4", 128, *stored))
    # The default tiles, SwiGLU's (both halves in one product) included.
    stored, wd, x, _ = _case(128, 3, 96, 256, torch.float32, device, 3)
    gate, up = (x.double() @ wd.double().T).split(48, dim=1)
    y = rows_mod.gemv_rows(x, "int4", 128, *stored, swiglu=True)
    assert y.shape == (3, 48) and rel_err(y, F.silu(gate) * up) < 1e-5


def test_mma_tiles_follow_the_environment(monkeypatch):
    from torchchat.kernels.gemv_mma import pick_mma_config

    monkeypatch.delenv("TORCHCHAT_GEMV_MMA_TILES", raising=False)
    base = pick_mma_config("int4", 4096, 4096, 128)
    assert base.block_n % (16 * base.num_warps) == 0 and base.block_k % 128 == 0
    monkeypatch.setenv("TORCHCHAT_GEMV_MMA_TILES", '{"int4": [128, 128, 8], "int4:swiglu": [32, 256, 2]}')
    assert pick_mma_config("int4", 12288, 4096, 128) == GemvConfig(128, 128, 8)
    assert pick_mma_config("int4", 4096, 4096, 128) != GemvConfig(128, 128, 8)  # "int4:small" keeps its own
    assert pick_mma_config("int4", 11008, 4096, 128, swiglu=True) == GemvConfig(32, 256, 2)
    assert pick_mma_config("int4", 4096, 4096, 256).block_k == 256  # still a multiple of the group
    assert pick_mma_config("int4", 40000, 4096, 128).block_n == 128
    monkeypatch.setenv("TORCHCHAT_GEMV_MMA_TILES", '{"int4:small": [128, 128, 8]}')
    assert pick_mma_config("int4", 40, 4096, 128).block_n == 128  # not shrunk below 16 rows a warp


@pytest.mark.parametrize("tile,split", [((16, 128, 1, 4), 3), ((64, 256, 4), 2)])
@pytest.mark.parametrize("m", [5, 20])
def test_mma_split_k_adds_up_to_the_whole_product(device, tile, split, m):
    """K shared by `split` programs a tile (1280 inputs: 10 steps of 128 in slices of 4, 4 and 2; 5 of
    256 in 3 and 2), with every prologue and epilogue; NORM 2's sums of squares are split too. Twice in a
    row: the last program of each tile resets its counter, so a second launch adds up the same."""
    from torchchat.kernels.gemv_mma import _COUNTERS, gemv_mma

    n, k = 45, 1280
    stored, wd, x, gen = _case(128, m, 2 * n, k, torch.float32, device, 13 * m + split)
    g = (torch.rand(k, generator=gen) + 0.5).to(device)
    res = torch.randn(m, n, generator=gen).to(device)
    args = ("int4", 128, *stored)
    cfg = GemvConfig(*tile)
    for _ in range(2):
        plain = gemv_mma(x, *args, config=cfg, split=split)
        assert rel_err(plain, x.double() @ wd.double().T) < 1e-5
        fused = gemv_mma(x, *args, norm_weight=g, eps=1e-5, swiglu=True, residual=res, res_scale=0.5, config=cfg,
                         split=split)
        expect = torch.stack([_reference(x[i], wd, norm=g, swiglu=True, residual=res[i], res_scale=0.5)
                              for i in range(m)])
        assert rel_err(fused, expect) < 1e-5
        rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        y = gemv_mma(x, *args, rms_only=True, eps=1e-5, config=cfg, split=split)
        assert rel_err(y, F.linear(x * rms, wd)) < 1e-5
        assert rel_err(y, gemv_mma(x, *args, rms_only=True, eps=1e-5, config=cfg, split=1)) < 1e-6
    assert int(_COUNTERS[x.device].count_nonzero()) == 0


def test_mma_split_follows_the_programs_and_the_environment(monkeypatch):
    from torchchat.kernels.gemv_mma import SPLIT_MIN_STEPS, SPLIT_TARGET, MmaRowsError, pick_split

    monkeypatch.delenv("TORCHCHAT_MMA_SPLIT_TARGET", raising=False)
    assert pick_split(SPLIT_TARGET, 32) == 1  # enough programs already
    assert pick_split(256, 32) == min(-(-SPLIT_TARGET // 256), 32 // SPLIT_MIN_STEPS)
    assert pick_split(256, 2 * SPLIT_MIN_STEPS - 1) == 1  # too short a loop to share
    monkeypatch.setenv("TORCHCHAT_MMA_SPLIT_TARGET", "0")
    assert pick_split(16, 1000) == 1
    monkeypatch.setenv("TORCHCHAT_MMA_SPLIT_TARGET", "4096")
    assert pick_split(256, 1000) == 16
    monkeypatch.setenv("TORCHCHAT_MMA_SPLIT_TARGET", "many")
    with pytest.raises(MmaRowsError, match="TORCHCHAT_MMA_SPLIT_TARGET='many'"):
        pick_split(256, 1000)
