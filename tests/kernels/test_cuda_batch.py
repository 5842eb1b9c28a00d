"""On a CUDA machine: small-batch decode on the fused path. The multi-row GEMV on the tensor cores at
a 7B layer's shape against F.linear on the dequantized weight, and the CUDA-core few-rows kernel
(gemv_few.py) and the one-dot int4 kernel (gemv_mma.py) against it; the engine's decode forward captured as
one CUDA graph per batch bucket, each replayed without capturing again; concurrent greedy sequences
through BatchEngine with CUDA graphs equal to each alone; and a 7B-shape (bf16) batch step against
each row's batch-1 step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import needs_cuda
from tests.kernels.numerics import rel_err

pytestmark = needs_cuda

QUANT = {"bf16": None, "int8": ("int8", 0), "int4": ("int4", 128)}


@pytest.mark.parametrize("fmt,group", [("float", 0), ("int8", 0), ("int8", 32), ("int4", 128), ("int4", 32)])
@pytest.mark.parametrize("m", [2, 5, 16])
def test_gemv_rows_at_a_7b_layer_shape(fmt, group, m):
    pytest.importorskip("triton")
    from torchchat.kernels.formats import dequantize, empty_storage, quantize_into
    from torchchat.kernels.gemv_rows import gemv_rows

    n, k = 4096, 4096
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    st = empty_storage(fmt, n, k, group, torch.bfloat16, "cuda")
    quantize_into(st, fmt, group, 0, w)
    wd = dequantize(fmt, group, st["weight"], st.get("scales"), st.get("mins"), torch.bfloat16)
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    res = torch.randn(m, n, device="cuda", generator=gen, dtype=torch.bfloat16)
    y = gemv_rows(x, fmt, group, st["weight"], st.get("scales"), st.get("mins"), residual=res, res_scale=0.5)
    expect = res.float() + 0.5 * F.linear(x.float(), wd.float())
    assert rel_err(y, expect) < 1e-2  # one bf16 rounding of the product and one of the sum



@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 32), ("int8", 0), ("int8", 32)])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
def test_fma_rows_equal_the_dot_rows_on_the_gpu(fmt, group, m):
    """The CUDA-core kernel (gemv_few.py, with its PTX unpacking) against the tensor-core kernel and
    F.linear at a 7B layer's shape, with the prologue and epilogues the layers fuse."""
    pytest.importorskip("triton")
    from torchchat.kernels.formats import dequantize, empty_storage, quantize_into
    from torchchat.kernels.gemv_few import gemv_few
    from torchchat.kernels.gemv_rows import gemv_rows

    n, k = 4096, 4096
    gen = torch.Generator(device="cuda").manual_seed(100 + m)
    w = torch.randn(2 * n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    st = empty_storage(fmt, 2 * n, k, group, torch.bfloat16, "cuda")
    quantize_into(st, fmt, group, 0, w)
    args = (fmt, group, st["weight"], st.get("scales"), st.get("mins"))
    wd = dequantize(*args, torch.bfloat16).float()
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    res = torch.randn(m, 2 * n, device="cuda", generator=gen, dtype=torch.bfloat16)  # no SwiGLU: 2n outputs
    for extra in ({}, {"rms_only": True, "eps": 1e-5, "swiglu": True}, {"residual": res, "res_scale": 0.5},
                  {"out_dtype": torch.float32}):
        fma = gemv_few(x, *args, **extra)
        dot = gemv_rows(x, *args, kernel="dot", **extra)
        assert fma.dtype == dot.dtype and fma.shape == dot.shape
        assert rel_err(fma, dot) < 1.5e-2, extra  # a bf16 rounding of each output and weight (dot only)
    expect = F.linear(x.float(), wd)
    assert rel_err(gemv_few(x, *args, out_dtype=torch.float32), expect) < 1e-2


# Both MMA kinds (warpgroup: 4 or 8 warps; warp: 1 or 2), both prefetch depths, packed and float32
# dequantization: the PTX pieces the CPU interpreter cannot run.
@pytest.mark.parametrize("tile", [(64, 256, 4), (128, 128, 8, 2), (32, 256, 2, 2), (16, 256, 1), (16, 256, 1, 4)])
@pytest.mark.parametrize("group", [128, 32])
@pytest.mark.parametrize("packed", [True, False])
def test_mma_rows_equal_the_dot_rows_on_the_gpu(monkeypatch, tile, group, packed):
    """The one-dot int4 kernel (gemv_mma.py) against the per-field tensor-core kernel and F.linear at
    a 7B layer's shape (11008 inputs: a last step past the row's end), 5 rows, every fusion."""
    pytest.importorskip("triton")
    from torchchat.kernels.formats import dequantize, empty_storage, quantize_into
    from torchchat.kernels.gemv import GemvConfig
    from torchchat.kernels.gemv_mma import gemv_mma
    from torchchat.kernels.gemv_rows import gemv_rows

    monkeypatch.setenv("TORCHCHAT_MMA_PACKED", "1" if packed else "0")
    n, k, m = 4096, 11008, 5
    gen = torch.Generator(device="cuda").manual_seed(group)
    w = torch.randn(2 * n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    st = empty_storage("int4", 2 * n, k, group, torch.bfloat16, "cuda")
    quantize_into(st, "int4", group, 0, w)
    args = ("int4", group, st["weight"], st["scales"], st["mins"])
    wd = dequantize(*args, torch.bfloat16).float()
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    res = torch.randn(m, 2 * n, device="cuda", generator=gen, dtype=torch.bfloat16)
    cfg = GemvConfig(*tile)
    for extra in ({}, {"rms_only": True, "eps": 1e-5, "swiglu": True}, {"residual": res, "res_scale": 0.5},
                  {"out_dtype": torch.float32}):
        mma = gemv_mma(x, *args, config=cfg, **extra)
        dot = gemv_rows(x, *args, kernel="dot", **extra)
        assert mma.dtype == dot.dtype and mma.shape == dot.shape
        assert rel_err(mma, dot) < 1.5e-2, extra  # both round each weight alike: summation order, output rounding
    logits = gemv_mma(x, *args, config=cfg, out_dtype=torch.float32)
    assert rel_err(logits, F.linear(x.float(), wd)) < 1e-2
    # Row i alone gives row i of the batch.
    assert rel_err(gemv_mma(x[2:3].contiguous(), *args, config=cfg, out_dtype=torch.float32), logits[2:3]) < 1e-6


def _tiny_fused(dtype=torch.float32):
    from tests.kernels.test_fused_model import _fused
    from torchchat.model.config import ModelConfig

    cfg = ModelConfig.from_params(dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                                       hidden_dim=256, max_seq_len=128))
    model, _ = _fused(cfg, "cuda", dtype)
    return model


def _counting(step):
    """Count the graphs `step` (a CudaGraphStep) captures."""
    captured = []
    capture = step._capture

    def counted(inputs):
        captured.append(tuple(tuple(t.shape) for t in inputs))
        return capture(inputs)

    step._capture = counted
    return captured


def test_one_graph_per_batch_bucket():
    pytest.importorskip("triton")
    from torchchat.generation.steps import CompileOptions, CudaGraphStep, Steps
    from torchchat.runtime.base import EagerRuntime

    runtime = EagerRuntime(_tiny_fused())
    runtime.setup(4, 128)
    steps = Steps(runtime.forward, runtime.device, CompileOptions(decode=True), runtime.graph_key)
    forward = steps.decode_forward()
    assert isinstance(forward, CudaGraphStep)
    captured = _counting(forward)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, b in enumerate([2, 4, 2, 1, 4, 2]):
            tokens = torch.randint(0, 96, (b, 1), generator=gen).cuda()
            pos = (torch.arange(b) * 5 + 10 + i).cuda()
            pos = pos if b == 1 else pos.view(b, 1)
            got = forward(tokens, pos).clone()
            # Eager, same inputs: rewrites the same cache entries, so it must give the same logits.
            assert rel_err(got, runtime.forward(tokens, pos)) < 1e-6
    assert forward.graphs == 3 and len(captured) == 3  # buckets 1, 2 and 4, each captured once
    runtime.setup(4, 64)  # new caches: the captured addresses are stale
    with torch.no_grad():
        forward(tokens, pos)
    assert forward.graphs == 1 and len(captured) == 4


def test_engine_with_cuda_graphs_batch_equals_each_sequence_alone():
    pytest.importorskip("triton")
    from tests.generation.runtimes import drive
    from tests.kernels.test_fused_batch import PROMPTS
    from torchchat.generation.batch import BatchEngine, SequenceRequest, make_steps
    from torchchat.generation.steps import CompileOptions
    from torchchat.runtime.base import EagerRuntime

    runtime = EagerRuntime(_tiny_fused())
    requests = [SequenceRequest(tuple(p), n) for p, n in zip(PROMPTS, (20, 12, 16))]
    alone = []
    for r in requests:
        engine = BatchEngine(runtime, 1, 128, steps=make_steps(runtime, CompileOptions(decode=True)))
        alone.append(drive(engine, [r], [0])[0][0])
    engine = BatchEngine(runtime, 4, 128, steps=make_steps(runtime, CompileOptions(decode=True)))
    captured = _counting(engine.steps.decode_forward())
    together = drive(engine, requests, [0, 0, 2])[0]
    assert together == alone
    assert len(captured) == len(set(captured)) >= 2  # buckets 2 and 4 (and 1 at the end), once each


@pytest.mark.parametrize("quant", ["bf16", "int4"])  # int8: the layer-shape test above
def test_7b_batch_step_matches_each_row_alone(quant):
    """A decode step of 8 rows (one idle) of the Llama-2-7B shape against each live row's batch-1 step
    in its own cache row. bf16 through 32 random layers in two summation orders: the bound is the
    estimate test_cuda_models uses for fused-vs-modules, not a measured one."""
    pytest.importorskip("triton")
    import json
    from pathlib import Path

    import torchchat
    from torchchat.kernels.formats import LinearQuant
    from torchchat.kernels.transform import fuse_model
    from torchchat.model.config import ModelConfig
    from torchchat.model.dummy_weights import dummy_tensor
    from torchchat.model.transformer import Transformer

    params = json.loads((Path(torchchat.__file__).parent / "model_params" / "7B.json").read_text())
    params.setdefault("vocab_size", 32000)
    cfg = ModelConfig.from_params(params)
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    lq = LinearQuant(*QUANT[quant]) if QUANT[quant] else None
    with torch.no_grad():
        fuse_model(model, lambda n: dummy_tensor(n, shapes[n], "cuda", torch.bfloat16, 1234), lq, "cuda", torch.bfloat16)
        model.eval().setup_caches(8, 512)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 32000, (8, 1), generator=gen).cuda()
        pos = torch.tensor([100, 3, 250, 0, 400, 37, 64, -1]).cuda().view(8, 1)  # row 7 idle
        batch = model(tokens, pos)[:, 0]
        assert torch.isfinite(batch).all()
        for i in range(7):
            alone = model(tokens[i : i + 1], pos[i], i)[0, 0]
            assert rel_err(batch[i], alone) < 1e-1, i
        del model
        torch.cuda.empty_cache()
