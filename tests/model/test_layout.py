"""torchchat.model.layout: restacked projections compute what the Meta-named layers compute."""
from dataclasses import replace

import pytest
import torch

from torchchat.model.layout import TransposedLinear, optimize_for_decode
from torchchat.model.transformer import Transformer


def _random(cfg, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def _logits(model, tokens):
    model.setup_caches(1, 64)
    with torch.no_grad():
        prefill = model(tokens[:, :10], torch.arange(10))
        steps = [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(10, tokens.size(1))]
    return torch.cat([prefill, *steps], dim=1)


@pytest.mark.parametrize("dtype, transposed", [(torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("n_kv_heads", [8, 2])
def test_restacked_model_gives_the_same_logits(tiny_config, dtype, transposed, n_kv_heads):
    cfg = replace(tiny_config, n_kv_heads=n_kv_heads)
    model, tokens = _random(cfg, dtype), torch.randint(0, cfg.vocab_size, (1, 20))
    before = _logits(model, tokens)
    n_params = sum(p.numel() for p in model.parameters())
    done = optimize_for_decode(model)
    assert done == sorted(["wqkv", "w13"] + (["output transposed"] if transposed else []))
    assert isinstance(model.output, TransposedLinear) is transposed
    attn, ff = model.layers[0].attention, model.layers[0].feed_forward
    assert not hasattr(attn, "wq") and not hasattr(ff, "w1") and attn.wqkv.weight.shape[0] == (cfg.n_heads + 2 * n_kv_heads) * cfg.head_dim
    assert sum(p.numel() for p in model.parameters()) == n_params  # moved, not copied
    torch.testing.assert_close(_logits(model, tokens), before, atol=1e-5, rtol=1e-5)
    assert optimize_for_decode(model) == []  # once only


def test_tied_output_is_left_alone(tiny_config):
    model = _random(replace(tiny_config, tie_embeddings=True))
    assert optimize_for_decode(model) == ["w13", "wqkv"]
    assert model.output.weight is model.tok_embeddings.weight


def test_quantized_layers_keep_their_own_layout(tiny_config):
    from torchchat.quantize import apply_quantization, parse_quantize

    model = _random(tiny_config, torch.bfloat16)
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 16))
    # torchao's int8 tensors (cpu_kernels=False); torchchat's packed layers are stacked, tested with them.
    apply_quantization(model, parse_quantize('{"linear:int8": {"groupsize": 0}}'), "cpu", cpu_kernels=False)
    before = _logits(model, tokens)
    assert optimize_for_decode(model) == []
    assert model.layers[0].attention.wqkv is None and model.layers[0].feed_forward.w13 is None
    torch.testing.assert_close(_logits(model, tokens), before)
