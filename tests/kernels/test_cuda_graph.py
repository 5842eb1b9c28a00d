"""On a CUDA machine: the fused model through build_model and the engine, decode step captured as one
CUDA graph (--compile), gives the eager PyTorch modules' greedy tokens (fp32, stories260K)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import needs_cuda

pytestmark = needs_cuda


def test_graph_decode_equals_eager_modules(stories260k_dir):
    pytest.importorskip("triton")
    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions, CudaGraphStep

    src = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin",
                      tokenizer_path=stories260k_dir / "tok512.model")
    fused = build_model(BuildSpec(source=src, device="cuda", dtype=torch.float32))
    plain = build_model(BuildSpec(source=src, device="cuda", dtype=torch.float32, cuda_kernels=False))
    assert getattr(fused.model, "fused_kernels", False) and not getattr(plain.model, "fused_kernels", False)
    cfg = GenerationConfig(max_new_tokens=60, sampling=SamplingParams(temperature=0.0), stop_ids=frozenset())
    bos = [fused.tokenizer.bos_id]
    graph = make_engine(fused, CompileOptions(decode=True), max_seq_len=64)
    got = list(graph.tokens(bos, cfg))
    assert isinstance(graph.steps.decode(cfg.sampling), CudaGraphStep)
    want = list(make_engine(plain, max_seq_len=64).tokens(bos, cfg))
    assert got == want
    # Replaying again from the start (same captured graph, cache rewritten) gives the same tokens.
    assert list(graph.tokens(bos, cfg)) == want
