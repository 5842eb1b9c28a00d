"""The fused model end to end against the Transformer it replaces: same weights, same greedy tokens,
close logits, for the float and the quantized formats; and weights built one matrix at a time."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.numerics import rel_err  # noqa: E402
from torchchat.model.dummy_weights import dummy_tensor, init_dummy_weights  # noqa: E402
from torchchat.kernels.formats import LinearQuant  # noqa: E402
from torchchat.kernels.modules import FusedBlock  # noqa: E402
from torchchat.kernels.transform import fuse_model  # noqa: E402
from torchchat.model.config import ModelConfig  # noqa: E402
from torchchat.model.transformer import Transformer  # noqa: E402

SEED = 7


@pytest.fixture
def cfg():
    # GQA, head_dim 32, rows of 128 and 256 inputs (the int8 per-channel packing block is 128).
    return ModelConfig.from_params(dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                                        hidden_dim=256, max_seq_len=64))


def _norm_weight(name, shape, device, dtype):
    """A norm weight that is not all ones (dummy weights' are), so that folding it shows."""
    gen = torch.Generator().manual_seed(len(name))
    return (0.5 + torch.rand(shape, generator=gen)).to(device=device, dtype=dtype)


def _fused(cfg, device, dtype, quant=None, random_norms=False):
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def source(n):
        if random_norms and n.endswith("norm.weight"):
            return _norm_weight(n, shapes[n], device, dtype)
        return dummy_tensor(n, shapes[n], device, dtype, SEED)

    notes = fuse_model(model, source, quant, device, dtype)
    return model.eval(), notes


def _reference(cfg, device, dtype):
    with torch.device("meta"):
        model = Transformer(cfg)
    init_dummy_weights(model, device, dtype, SEED)
    return model.eval()


def _greedy(model, prompt, steps, device):
    """Prefill `prompt` (parallel, PyTorch path), then `steps` one-token decodes (fused kernels)."""
    model.setup_caches(1, 64)
    tokens, all_logits = [], []
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device))
        pos = len(prompt)
        for _ in range(steps):
            tok = int(logits[0, -1].argmax())
            tokens.append(tok)
            logits = model(torch.tensor([[tok]], device=device), torch.tensor([pos], device=device))
            all_logits.append(logits[0, -1])
            pos += 1
    return tokens, torch.stack(all_logits)


def test_fused_float_model_decodes_like_the_transformer(cfg, device):
    ref = _reference(cfg, device, torch.float32)
    fused, notes = _fused(cfg, device, torch.float32)
    assert notes == [] and all(isinstance(b, FusedBlock) for b in fused.layers)
    # Same weights: dummy weights depend on the parameter name only.
    nq = cfg.n_heads * cfg.head_dim
    assert torch.equal(fused.layers[1].attention.wqkv.weight[:nq], ref.layers[1].attention.wq.weight)
    assert torch.equal(fused.layers[0].feed_forward.w13.weight[cfg.hidden_dim:], ref.layers[0].feed_forward.w3.weight)
    prompt = [1, 5, 9, 17, 33]
    ref_tokens, ref_logits = _greedy(ref, prompt, 6, device)
    tokens, logits = _greedy(fused, prompt, 6, device)
    assert tokens == ref_tokens
    assert rel_err(logits, ref_logits) < 1e-5


def _dequantized_reference(cfg, fused, device):
    """A plain Transformer holding exactly the weights the quantized fused model stands for."""
    ref = _reference(cfg, device, torch.float32)
    nq, nkv, hid = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    with torch.no_grad():
        for fb, rb in zip(fused.layers, ref.layers):
            a, f = fb.attention, fb.feed_forward
            rb.attention.wq.weight.copy_(a.wqkv.dequantized(slice(0, nq)))
            rb.attention.wk.weight.copy_(a.wqkv.dequantized(slice(nq, nq + nkv)))
            rb.attention.wv.weight.copy_(a.wqkv.dequantized(slice(nq + nkv, None)))
            rb.attention.wo.weight.copy_(a.wo.dequantized())
            rb.feed_forward.w1.weight.copy_(f.w13.dequantized(slice(0, hid)))
            rb.feed_forward.w3.weight.copy_(f.w13.dequantized(slice(hid, None)))
            rb.feed_forward.w2.weight.copy_(f.w2.dequantized())
            # Integer formats fold the norm weights into the next layer (the norms then hold ones).
            rb.attention_norm.weight.copy_(fb.attention_norm.weight)
            rb.ffn_norm.weight.copy_(fb.ffn_norm.weight)
        ref.output.weight.copy_(fused.output.dequantized())
        ref.norm.weight.copy_(fused.norm.weight)
    return ref


@pytest.mark.slow  # about a minute each in Triton's interpreter on a CPU
@pytest.mark.parametrize("quant", [LinearQuant("int8", 0), LinearQuant("int4", 32)])  # int8 groups: test_gemv
def test_quantized_fused_model_matches_its_dequantized_weights(cfg, device, quant):
    fused, notes = _fused(cfg, device, torch.float32, quant, random_norms=True)
    assert fused.layers[0].attention.wqkv.fmt == quant.kind
    assert notes == []  # every row length (128, 256) fits the packing block
    # The norm weights went into the next layers' columns; the norms now hold ones.
    assert fused.layers[0].attention.wqkv.norm_folded and bool((fused.layers[0].ffn_norm.weight == 1).all())
    ref = _dequantized_reference(cfg, fused, device)
    prompt = [3, 1, 4, 1, 5]
    ref_tokens, ref_logits = _greedy(ref, prompt, 5, device)
    tokens, logits = _greedy(fused, prompt, 5, device)
    assert tokens == ref_tokens
    assert rel_err(logits, ref_logits) < 1e-5
    if quant.kind != "int8":
        return  # int4's own error on random weights (~15% of the logits) would hide a folding mistake
    # And it is still the model it was made from (norm weights applied), up to int8's error.
    original = _reference(cfg, device, torch.float32)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(_norm_weight(name, p.shape, device, torch.float32))
    _, original_logits = _greedy(original, prompt, 5, device)
    assert rel_err(logits, original_logits) < 0.02


def test_unfit_groups_stay_in_model_dtype(cfg, device):
    fused, notes = _fused(cfg, device, torch.float32, LinearQuant("int4", 256))
    assert fused.layers[0].feed_forward.w2.fmt == "int4"  # 256 inputs
    assert fused.layers[0].feed_forward.w13.fmt == "float"  # 128 inputs: not a multiple of 256
    assert fused.output.fmt == "float"
    assert len(notes) == 1 and "w1/w3" in notes[0] and "output" in notes[0] and "w2" not in notes[0]


def test_weights_are_materialized_one_matrix_at_a_time(cfg, device):
    """The builder drops each original matrix before asking for the next (the peak-memory bound)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    alive: list[weakref.ref] = []
    fetched = []

    def source(name):
        gc.collect()
        assert all(r() is None for r in alive), f"an earlier matrix is still held when {name} is fetched"
        t = dummy_tensor(name, shapes[name], device, torch.float32, SEED)
        if t.dim() == 2 and not name.startswith("tok_embeddings"):
            alive.append(weakref.ref(t))
        fetched.append(name)
        return t

    fuse_model(model, source, LinearQuant("int4", 32), device, torch.float32)
    matrices = [n for n in fetched if len(shapes[n]) == 2]
    assert set(fetched) == set(shapes) and sorted(matrices) == sorted(set(matrices))  # each matrix once


def test_short_prompt_prefill_takes_the_multi_row_kernels(cfg, device, monkeypatch):
    """A prompt of a few tokens is multiplied by the multi-row int4 kernels (modules.SHORT_PREFILL_ROWS)
    instead of by dequantized weights: the same logits up to summation order, and the kernels ran (on a
    CPU too here, through the interpreter, though the shipped path is CUDA's)."""
    from torchchat.kernels import modules

    monkeypatch.setattr(modules, "_SHORT_PREFILL_DEVICES", ("cuda", "cpu"))
    fused, _ = _fused(cfg, device, torch.float32, LinearQuant("int4", 32))
    prompt = [3, 1, 4, 1, 5, 9, 2]
    calls = []
    real = modules.gemv_rows
    monkeypatch.setattr(modules, "gemv_rows", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))

    def prefill():
        fused.setup_caches(1, 64)
        with torch.no_grad():
            return fused(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device))

    short = prefill()
    # q|k|v, wo, w1|w3 with SwiGLU, w2 per layer; the output projection keeps its own path.
    assert calls == [(len(prompt), cfg.dim), (len(prompt), cfg.dim), (len(prompt), cfg.dim),
                     (len(prompt), cfg.hidden_dim)] * cfg.n_layers
    monkeypatch.setattr(modules, "SHORT_PREFILL_ROWS", {})
    calls.clear()
    dequantized = prefill()
    assert calls == []
    assert rel_err(short, dequantized) < 1e-5
