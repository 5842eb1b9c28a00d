"""The original torchchat's low-bit quantizers: linear:a8wxdq and embedding:wx (1-7-bit weights, torchao's
Int8DynamicActivationIntxWeightConfig / IntxWeightOnlyConfig) and linear:afpwx (MPS only)."""
import json
import platform

import pytest
import torch
from torch import nn

from torchchat.errors import QuantizationError
from torchchat.model.registry import params_table
from torchchat.quantize import Scheme, apply_quantization, parse_quantize

ARM = platform.machine().lower() in ("arm64", "aarch64")


def test_defaults_round_trip_and_the_embedding_takes_one_scheme():
    plan = parse_quantize('{"linear:a8wxdq": {}, "embedding:wx": {"bitwidth": 2}}')
    assert plan.linear == Scheme("linear:a8wxdq", 4, 256, False)
    assert plan.embedding == Scheme("embedding:wx", 2, 32, True)
    assert parse_quantize(json.dumps(plan.to_json())) == plan
    assert parse_quantize('{"linear:a8wxdq": {"bitwidth": 3, "groupsize": 128, "has_weight_zeros": true}}'
                          ).linear == Scheme("linear:a8wxdq", 3, 128, True)
    with pytest.raises(QuantizationError, match="'embedding' and 'embedding:wx' both quantize the embedding"):
        parse_quantize('{"embedding": {}, "embedding:wx": {}}')


@pytest.mark.parametrize("recipe, expected", [
    ('{"linear:a8wxdq": {"bitwidth": 8}}', "'linear:a8wxdq' bitwidth 8 is not valid; valid: 1, 2, 3, 4, 5, 6, 7"),
    ('{"embedding:wx": {"bitwidth": 0}}', "'embedding:wx' bitwidth 0 is not valid; valid: 1, 2, 3, 4, 5, 6, 7"),
    ('{"linear:a8wxdq": {"has_weight_zeros": 1}}', "has_weight_zeros 1 is not valid; valid: false, true"),
    ('{"linear:afpwx": {"groupsize": 0}}', "'linear:afpwx' groupsize 0 is not valid; valid: 32, 64, 128, 256"),
    ('{"linear:a8wxdq": {}, "linear:afpwx": {}}', "both quantize the linear layers"),
])
def test_invalid_lowbit_recipes_list_what_is_valid(recipe, expected):
    with pytest.raises(QuantizationError) as info:
        parse_quantize(recipe)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_afpwx_is_refused_off_mps_and_a8wxdq_off_the_cpu():
    cfg = params_table("stories15M")
    with pytest.raises(QuantizationError) as info:
        parse_quantize('{"linear:afpwx": {"bitwidth": 3}}').validate(cfg, "cpu", torch.float32)
    assert "'linear:afpwx' cannot run on cpu; it runs on: mps" in str(info.value)
    assert "on a CPU use linear:a8wxdq" in str(info.value)
    with pytest.raises(QuantizationError, match="'linear:a8wxdq' cannot run on cuda; it runs on: cpu"):
        parse_quantize('{"linear:a8wxdq": {}}').validate(cfg, "cuda", torch.bfloat16)
    notes = parse_quantize('{"linear:a8wxdq": {"groupsize": 32}}').validate(cfg, "cpu", torch.float32)
    assert any("reference path" in n for n in notes) != ARM  # said where the fast ARM kernels are absent


@pytest.mark.parametrize("bits", range(1, 8))
@pytest.mark.parametrize("zeros", [False, True])
def test_a8wxdq_weights_take_2_to_the_bits_levels_and_the_layer_computes_with_them(bits, zeros):
    torch.manual_seed(bits)
    layer = nn.Linear(64, 96)
    w = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    recipe = f'{{"linear:a8wxdq": {{"bitwidth": {bits}, "groupsize": 32, "has_weight_zeros": {str(zeros).lower()}}}}}'
    apply_quantization(model, parse_quantize(recipe), "cpu")
    q = model[0].weight
    assert q.qdata.min() >= -(2 ** (bits - 1)) and q.qdata.max() <= 2 ** (bits - 1) - 1
    deq = q.dequantize()
    groups = deq.reshape(96, 2, 32)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 2 ** bits
    scale = q.scale.reshape(96, 2, 1)
    assert ((groups - w.reshape(96, 2, 32)).abs() <= scale * (0.5 if bits > 1 or zeros else 1.0) + 1e-6).all()
    # The layer is int8 dynamic activations times those weights: close to the float product with them.
    x = torch.randn(5, 64)
    want = x @ deq.T + layer.bias
    got = model[0](x)
    assert torch.allclose(got, want, atol=0.02 * want.abs().max().item())


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7])
def test_embedding_wx_rows_are_the_dequantized_table(bits):
    torch.manual_seed(bits)
    emb = nn.Embedding(100, 64)
    table = emb.weight.detach().clone()
    model = nn.Sequential(emb)
    apply_quantization(model, parse_quantize(f'{{"embedding:wx": {{"bitwidth": {bits}, "groupsize": 32}}}}'), "cpu")
    q = model[0].weight
    assert q.qdata.min() >= -(2 ** (bits - 1)) and q.qdata.max() <= 2 ** (bits - 1) - 1
    deq = q.dequantize()
    ids = torch.tensor([0, 7, 99, 7])
    assert torch.equal(model[0](ids), deq[ids])
    err = (deq - table).abs().mean() / table.abs().mean()
    assert err < {1: 1.0, 2: 0.5, 3: 0.25, 5: 0.06, 7: 0.015}[bits], err
