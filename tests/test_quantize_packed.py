"""torchchat's linear recipes on the CPU's native kernels: weights stored as GGML blocks (Q8_0 for
linear:int8, Q4_1 for linear:int4, Q4_0 for linear:a8w4dq; torchchat/quantize_packed.py), checked
against the float model, the blocks against the recipe's own grouping, and torch.export.

Tolerances: against the float model whose weights are what the blocks stand for (the gguf package's
reference dequantizer reads them back), only the kernels' int8 activations differ: 4%, as in
tests/checkpoint/test_gguf_packed.py. Against the unquantized model the recipe's own quantization adds
its error (int8: ~0.5% per weight; 4-bit: ~8-10% per weight, which random 2-layer weights amplify to
0.15-0.32 at the logits, measured): bounds about 1.5x those, to catch a gross packing error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchchat.model.config import ModelConfig
from torchchat.model.packed import PackedLinear, kernels_unavailable
from torchchat.model.transformer import Transformer
from torchchat.quantize import apply_quantization, parse_quantize
from torchchat.quantize_packed import pack_q8_0

pytestmark = pytest.mark.skipif(kernels_unavailable() is not None, reason=f"CPU kernels: {kernels_unavailable()}")

CFG = ModelConfig.from_params(dict(dim=256, hidden_dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                   max_seq_len=64))
TOKENS, POS = torch.tensor([[1, 40, 7, 200, 311, 9, 60, 2]]), torch.arange(8)
CASES = {  # recipe -> (GGML type id, bound on the logits' relative error against the float model)
    '{"linear:int8": {}}': (8, 0.05),
    '{"linear:int8": {"groupsize": 64}}': (8, 0.05),
    '{"linear:int4": {"groupsize": 32}}': (3, 0.25),
    '{"linear:int4": {"groupsize": 256}}': (3, 0.5),
    '{"linear:a8w4dq": {"groupsize": 128}}': (2, 0.5),
}
# Against the float model whose weights are what the blocks stand for: the kernels' int8 activations only
# (tests/checkpoint/test_gguf_packed.py measured 1.6-2%).
KERNEL_TOL = 0.04


def _dequantized(model: nn.Module) -> nn.Module:
    """A copy of `model` with every PackedLinear replaced by nn.Linear holding the weight its blocks stand
    for (the gguf package's reference dequantizer)."""
    import copy

    from gguf import GGMLQuantizationType, quants

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, PackedLinear):
            w = quants.dequantize(m.weight.numpy(), GGMLQuantizationType(m.qtype)).reshape(m.out_features, -1)
            linear = nn.Linear(m.in_features, m.out_features, bias=False)
            linear.weight = nn.Parameter(torch.from_numpy(w.copy()).to(ref.norm.weight.dtype), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, linear)
    return ref


def _model(dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CFG).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.05 * torch.randn_like(p))
    model.to(dtype).setup_caches(1, 64)
    return model


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recipe_packs_every_linear_and_stays_close(recipe, dtype):
    qtype, bound = CASES[recipe]
    model = _model(dtype)
    with torch.no_grad():
        ref = model(TOKENS, POS)
        assert parse_quantize(recipe).validate(CFG, "cpu", dtype) == []
        apply_quantization(model, parse_quantize(recipe), "cpu")
        out = model(TOKENS, POS)
    linears = [m for name, m in model.named_modules() if name.startswith("layers.") or name == "output"]
    packed = [m for m in linears if isinstance(m, PackedLinear)]
    assert len(packed) == 7 * CFG.n_layers + 1 and all(m.qtype == qtype for m in packed)
    assert not any(type(m) is nn.Linear for m in linears)
    assert _rel(out, ref) < bound  # the recipe's own quantization error (4-bit on random weights: large)
    with torch.no_grad():
        exact = _dequantized(model)(TOKENS, POS)
    assert _rel(out, exact) < KERNEL_TOL


@pytest.mark.parametrize("groupsize", [0, 32, 128])
def test_q8_0_blocks_repeat_the_groups_scale(groupsize):
    """Every 32-value block of a group carries the group's scale, and the blocks read back (gguf's
    reference dequantizer) within half a step of the weight."""
    from gguf import GGMLQuantizationType, quants

    w = 0.05 * torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    blocks = pack_q8_0(w, groupsize).view(16, 8, 34)
    scales = blocks[..., :2].contiguous().view(torch.float16).float().squeeze(-1)  # (16, 8)
    per_group = 256 // 32 if groupsize == 0 else groupsize // 32
    assert torch.equal(scales, scales[:, ::per_group].repeat_interleave(per_group, dim=1))
    back = torch.from_numpy(quants.dequantize(blocks.reshape(16, -1).numpy(), GGMLQuantizationType.Q8_0).copy())
    assert ((back - w).abs() <= scales.repeat_interleave(32, dim=1) * 0.5 + 1e-7).all()


def test_packed_recipe_exports():
    model = _model(torch.float32)
    apply_quantization(model, parse_quantize('{"linear:int4": {"groupsize": 64}}'), "cpu")
    with torch.no_grad():
        eager = model(TOKENS, POS)
        ep = torch.export.export(model, (TOKENS, POS), strict=False)
        assert any("torchchat_cpu.ggml_linear" in str(n.target) for n in ep.graph.nodes)
        # The same ops; eager prefill attends over the written cache positions only, the traced graph
        # over the whole (masked) cache, so sums differ in the last bits, and where a value then sits
        # on an int8 rounding boundary of the next layer's activation quantization, by one code step:
        # measured 5.7e-3 relative (torch.equal held before eager prefill sliced the cache).
        got = ep.module()(TOKENS, POS)
        assert ((got - eager).norm() / eager.norm()).item() < 1e-2
