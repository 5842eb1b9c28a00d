"""The fused model decoding several sequences at once (the server's batched engine on CUDA): a decode
batch through the multi-row kernels gives the plain Transformer's logits for the same weights, rows
prefilled into their own cache rows; and through BatchEngine, concurrent greedy sequences that join at
different steps produce what each produces alone. On the CPU the kernels run in Triton's interpreter."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.generation.runtimes import drive  # noqa: E402
from tests.kernels.numerics import rel_err  # noqa: E402
from tests.kernels.test_fused_model import _dequantized_reference, _fused, _reference  # noqa: E402
from torchchat.kernels.formats import LinearQuant  # noqa: E402
from torchchat.model.config import ModelConfig  # noqa: E402

PROMPTS = [[1, 5, 9, 17, 33], [2, 7], [3, 1, 4, 1, 5, 9, 2]]
QUANTS = {"float": None, "int8": LinearQuant("int8", 0), "int4": LinearQuant("int4", 32)}


@pytest.fixture
def cfg():
    # As test_fused_model's: GQA, head_dim 32, rows of 128 and 256 inputs.
    return ModelConfig.from_params(dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                                        hidden_dim=256, max_seq_len=64))


@pytest.fixture
def big_tiles(monkeypatch):
    """Wider one-row tiles: fewer programs for the interpreter to run one by one (same results)."""
    tiles = {f"{f}{s}": [32, 128, 4] for f in ("float", "int8", "int4") for s in ("", ":small", ":large")}
    monkeypatch.setenv("TORCHCHAT_GEMV_TILES", str(tiles).replace("'", '"'))


def _batch_step(model, device, idle):
    """Prefill PROMPTS into cache rows 0..2 (each alone, `row`), then one decode step of all rows at
    their own positions, row 3 idle at position `idle`. Returns the step's logits (4, V)."""
    model.setup_caches(4, 64)
    with torch.no_grad():
        nxt = []
        for r, p in enumerate(PROMPTS):
            logits = model(torch.tensor([p], device=device), torch.arange(len(p), device=device), r)
            nxt.append(int(logits[0, -1].argmax()))
        tokens = torch.tensor(nxt + [0], device=device).view(4, 1)
        pos = torch.tensor([len(p) for p in PROMPTS] + [idle], device=device).view(4, 1)
        return model(tokens, pos)[:, 0]


@pytest.mark.parametrize("quant", list(QUANTS))
def test_decode_batch_matches_the_transformer(cfg, device, quant):
    fused, _ = _fused(cfg, device, torch.float32, QUANTS[quant], random_norms=quant != "float")
    ref = _reference(cfg, device, torch.float32) if quant == "float" else _dequantized_reference(cfg, fused, device)
    got = _batch_step(fused, device, idle=-1)
    want = _batch_step(ref, device, idle=63)  # the plain model's idle position: the last one
    assert rel_err(got[:3], want[:3]) < 1e-5
    assert torch.isfinite(got).all()
    # The idle row wrote nothing into its cache row.
    assert all(bool((layer.attention.kv_cache.k_cache[3] == 0).all()) for layer in fused.layers)
    # Rows sharing one (1,) position, as the plain Transformer also takes them.
    tokens, pos = torch.tensor([[4], [8]], device=device), torch.tensor([7], device=device)
    with torch.no_grad():
        assert rel_err(fused(tokens, pos), ref(tokens, pos)) < 1e-5


@pytest.mark.parametrize("quant", ["float", pytest.param("int4", marks=pytest.mark.slow)])
def test_prompts_of_several_rows_share_one_prefill_forward(cfg, device, quant):
    """What BatchEngine does with prompts that join together: right-padded to the longest, each row at
    its own positions, each row's own last position read (last_index). Same last logits and the same
    K/V at the prompts' positions as prefilling each prompt alone into its row."""
    fused, _ = _fused(cfg, device, torch.float32, QUANTS[quant], random_norms=quant != "float")
    width = max(len(p) for p in PROMPTS)
    with torch.no_grad():
        fused.setup_caches(4, 64)
        alone = [fused(torch.tensor([p], device=device), torch.arange(len(p), device=device), r)[0, -1]
                 for r, p in enumerate(PROMPTS)]
        kv_alone = [(layer.attention.kv_cache.k_cache.clone(), layer.attention.kv_cache.v_cache.clone())
                    for layer in fused.layers]
        fused.setup_caches(3, 64)  # new (zeroed) caches
        tokens = torch.tensor([p + p[-1:] * (width - len(p)) for p in PROMPTS], device=device)
        pos = torch.arange(width, device=device).expand(len(PROMPTS), -1).contiguous()
        last = torch.tensor([len(p) - 1 for p in PROMPTS], device=device)
        together = fused(tokens, pos, 0, last_only=True, last_index=last)[:, 0]
    assert rel_err(together, torch.stack(alone)) < 1e-5
    for layer, (k, v) in zip(fused.layers, kv_alone):
        cache = layer.attention.kv_cache
        for r, p in enumerate(PROMPTS):
            assert rel_err(cache.k_cache[r, :, : len(p)], k[r, :, : len(p)]) < 1e-5
            assert rel_err(cache.v_cache[r, :, : len(p)], v[r, :, : len(p)]) < 1e-5


# In Triton's interpreter on a 2-core CPU: float 12 s, int8 27 s, int4 42 s.
@pytest.mark.parametrize("quant", ["float", pytest.param("int8", marks=pytest.mark.slow),
                                   pytest.param("int4", marks=pytest.mark.slow)])
def test_engine_batch_equals_each_sequence_alone(cfg, device, quant, big_tiles):
    from torchchat.generation.batch import BatchEngine, SequenceRequest
    from torchchat.runtime.base import EagerRuntime

    fused, _ = _fused(cfg, device, torch.float32, QUANTS[quant], random_norms=quant != "float")
    runtime = EagerRuntime(fused)
    assert runtime.supports_batching and runtime.idle_position == -1
    requests = [SequenceRequest(tuple(p), n) for p, n in zip(PROMPTS, (6, 4, 5))]
    alone = [drive(BatchEngine(runtime, max_batch=1, max_seq_len=64), [r], [0])[0][0] for r in requests]
    # Three sequences in four slots, joining at steps 0, 0 and 2: buckets of 2 and 4 rows, one idle.
    together = drive(BatchEngine(runtime, max_batch=4, max_seq_len=64, prefill_chunk=8), requests, [0, 0, 2])[0]
    assert together == alone
