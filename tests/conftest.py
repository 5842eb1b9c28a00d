"""Shared fixtures: where the real test data lives, and a tiny random model."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TORCHCHAT_SHARED", ROOT.parent / "shared"))
STORIES260K = SHARED / "models" / "stories260K"

# For tests of the CUDA path (fused kernels, CUDA graphs, torchao's CUDA schemes): `pytestmark = needs_cuda`.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bf16_step(x: float) -> float:
    """The spacing of bf16 numbers (8 significant bits) at magnitude |x|: two logits this close may
    swap places under another summation order."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


# Tests never reach a model hub: fail fast instead of retrying for ~20 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip (a user's own clone may not have it; CI always does)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found (set TORCHCHAT_SHARED to the shared data folder)")
    return path


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_caches():
    """torch.compile keeps its compiled variants per code object for the whole process, and the steps'
    `step` closure (torchchat/generation/steps.py) is one code object for every engine a test module
    builds: past torch._dynamo's recompile limit (8) a later module's compile would fail. A real
    process builds one or two engines; the suite builds dozens."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


@pytest.fixture
def device() -> str:
    """Where the kernel tests run their kernels: the GPU, else the CPU (Triton's interpreter). Kept here
    rather than in tests/kernels/conftest.py, whose fixtures the GPU machine's pytest did not see (twice)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    return shared_path("models", "stories260K")


@pytest.fixture
def tiny_config():
    from torchchat.model.config import ModelConfig

    return ModelConfig.from_params(
        dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=32, max_seq_len=128)
    )


def random_transformer(cfg, std: float = 0.05):
    """A Transformer of `cfg` with seeded N(0, std) weights, in eval mode."""
    from torchchat.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


@pytest.fixture
def tiny_model(tiny_config):
    return random_transformer(tiny_config)


def assert_prefill_and_steps_match(model, tokens, expected, tol: float = 1e-4) -> None:
    """`model` (a torchchat Transformer) gives `expected` logits for `tokens` (1, S) both in one prefill
    and one token at a time through its KV cache."""
    with torch.no_grad():
        model.setup_caches(1, 64)
        full = model(tokens, torch.arange(tokens.size(1)))
        stepped = torch.cat([model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(tokens.size(1))], dim=1)
    torch.testing.assert_close(full, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(stepped, expected, atol=tol, rtol=tol)
