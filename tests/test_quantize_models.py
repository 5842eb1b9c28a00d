"""Quantized models on torchao's path (cpu_kernels=False: CUDA's path, and the CPU's where the native
kernels are unavailable; tests/test_quantize_packed.py covers the CPU kernels): each scheme swaps in the
intended torchao tensor types, stays close to the
unquantized model (real stories260K: greedy agreement over llama2.c's 200-token reference and logit
error; random weights of the stories15M shape: logit error and bytes), and exports."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from torchchat.build import BuildSpec, ModelSource, build_model
from torchchat.errors import QuantizationError
from torchchat.model.config import ModelConfig
from torchchat.model.registry import params_table
from torchchat.model.size import weight_nbytes
from torchchat.model.transformer import Transformer
from torchchat.quantize import apply_quantization, parse_quantize

pytest.importorskip("torchao")


def _weight_types(model: nn.Module) -> dict[str, str]:
    """Module name -> the class name of its weight, for every Linear and Embedding."""
    return {
        name: type(m.weight).__name__
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding))
    }


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative logit error ||out - ref|| / ||ref|| over all positions and the vocabulary."""
    return ((out.float() - ref).norm() / ref.norm()).item()


# --- stories260K: real weights ------------------------------------------------------------------------------


@dataclass
class Reference:
    tokens: torch.Tensor  # (1, 200): BOS and the first 199 greedy tokens, the model's input
    targets: torch.Tensor  # (200,): the 200 greedy tokens of llama2.c's reference run
    logits: torch.Tensor  # (200, 512) fp32 logits of the unquantized model on `tokens`


def _build_260k(stories260k_dir, dtype: torch.dtype, recipe: str | None = None):
    src = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin",
                      tokenizer_path=stories260k_dir / "tok512.model")
    built = build_model(BuildSpec(source=src, dtype=dtype, quant=parse_quantize(recipe) if recipe else None,
                                  cpu_kernels=False))
    built.model.setup_caches(1, 256)
    return built


@pytest.fixture(scope="module")
def reference(stories260k_dir) -> Reference:
    built = _build_260k(stories260k_dir, torch.float32)
    model, tok = built.model, built.tokenizer
    ids = [tok.bos_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.arange(1))
        for _ in range(200):
            ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([ids[-1:]]), torch.tensor([len(ids) - 1]))
        # The unquantized greedy run is llama2.c's own reference output.
        assert tok.decode(ids[1:]) == (stories260k_dir / "expected_greedy_200.txt").read_text()
        tokens = torch.tensor([ids[:-1]])
        return Reference(tokens, torch.tensor(ids[1:]), model(tokens, torch.arange(200))[0])


# stories260K: dim 64 (every row but w2's), hidden 172 (w1/w3 outputs, w2's row), vocab 512, tied output.
ATTN = [f"layers.{i}.attention.{w}" for i in range(5) for w in ("wq", "wk", "wv", "wo")]
FFN = [f"layers.{i}.feed_forward.{w}" for i in range(5) for w in ("w1", "w3")]
W2 = [f"layers.{i}.feed_forward.w2" for i in range(5)]
LINEAR = [*ATTN, *FFN, *W2, "output"]

# recipe, model dtype, {weight type: the modules that hold it; others stay Parameter}, min greedy agreement over
# the 200 reference tokens, max relative logit error.
# Measured (docs/quantization.md): agreement 0.99/0.99/0.835/0.91/0.855/1.0/0.99/0.87/0.91 and
# error 0.009/0.008/0.145/0.068/0.126/0.001/0.020/0.125/0.069 in this order.
CASES_260K = {
    "int8": ('{"linear:int8": {}}', torch.float32, {"Int8Tensor": LINEAR}, 0.97, 0.02),
    "int8-g32": ('{"linear:int8": {"groupsize": 32}}', torch.float32,
                 {"Int8Tensor": [*ATTN, *FFN, "output"], "Parameter": W2}, 0.97, 0.02),
    "int8-4bit": ('{"linear:int8": {"bitwidth": 4}}', torch.float32, {"IntxUnpackedToInt8Tensor": LINEAR}, 0.75, 0.2),
    # torchao's CPU int4 packing needs out_features % 16 == 0: w1/w3 (172 outputs) stay bf16.
    "int4": ('{"linear:int4": {"groupsize": 32}}', torch.bfloat16,
             {"Int4OpaqueTensor": [*ATTN, "output"], "Parameter": [*FFN, *W2]}, 0.8, 0.12),
    "a8w4dq": ('{"linear:a8w4dq": {"groupsize": 32}}', torch.float32,
               {"IntxUnpackedToInt8Tensor": [*ATTN, *FFN, "output"], "Parameter": W2}, 0.75, 0.2),
    "embedding8": ('{"embedding": {"bitwidth": 8}}', torch.float32,
                   {"IntxUnpackedToInt8Tensor": ["tok_embeddings"], "Parameter": LINEAR}, 0.98, 0.005),
    "embedding4": ('{"embedding": {"bitwidth": 4, "groupsize": 32}}', torch.float32,
                   {"IntxUnpackedToInt8Tensor": ["tok_embeddings"], "Parameter": LINEAR}, 0.95, 0.05),
    "mobile-32": ("mobile-32.json", torch.float32,
                  {"IntxUnpackedToInt8Tensor": ["tok_embeddings", *ATTN, *FFN, "output"], "Parameter": W2}, 0.75, 0.2),
    "embedding8+int4": ('{"embedding": {"bitwidth": 8}, "linear:int4": {"groupsize": 32}}', torch.bfloat16,
                        {"IntxUnpackedToInt8Tensor": ["tok_embeddings"], "Int4OpaqueTensor": [*ATTN, "output"],
                         "Parameter": [*FFN, *W2]}, 0.8, 0.12),
}


@pytest.mark.parametrize("case", list(CASES_260K))
def test_stories260k_scheme_types_and_closeness(case, stories260k_dir, reference):
    recipe, dtype, expected_types, min_agreement, max_error = CASES_260K[case]
    model = _build_260k(stories260k_dir, dtype, recipe).model
    expected = dict.fromkeys(["tok_embeddings", *LINEAR], "Parameter")  # unquantized unless listed
    expected.update({name: kind for kind, names in expected_types.items() for name in names})
    assert _weight_types(model) == expected
    with torch.no_grad():
        logits = model(reference.tokens, torch.arange(200))[0]
    agreement = (logits.argmax(-1) == reference.targets).float().mean().item()
    error = _rel_error(logits, reference.logits)
    print(f"\n{case}: greedy agreement {agreement:.3f}, relative logit error {error:.4f}")
    assert agreement >= min_agreement and error <= max_error
    assert error > 0  # the weights really changed


def test_a8w4dq_is_int4_symmetric_groupwise_weights_with_dynamic_activations(stories260k_dir):
    model = _build_260k(stories260k_dir, torch.float32, '{"linear:a8w4dq": {"groupsize": 32}}').model
    weight = model.layers[0].attention.wq.weight
    assert weight.activation_quantization is not None
    assert weight.target_dtype == torch.int4 and tuple(weight.block_size) == (1, 32)
    assert weight.qdata.min() >= -8 and weight.qdata.max() <= 7
    assert not weight.zero_point.any()  # symmetric
    weight_only = _build_260k(stories260k_dir, torch.float32, '{"linear:int8": {"bitwidth": 4, "groupsize": 32}}')
    assert weight_only.model.layers[0].attention.wq.weight.activation_quantization is None


def test_tied_output_and_embedding_are_quantized_each_their_own_way(stories260k_dir):
    plain = _build_260k(stories260k_dir, torch.bfloat16).model
    assert plain.output.weight is plain.tok_embeddings.weight
    recipe = '{"embedding": {"bitwidth": 8}, "linear:int4": {"groupsize": 64}}'
    model = _build_260k(stories260k_dir, torch.bfloat16, recipe).model
    assert type(model.output.weight).__name__ == "Int4OpaqueTensor"
    assert type(model.tok_embeddings.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert weight_nbytes(model) < weight_nbytes(plain)


def test_apply_checks_the_plan_before_touching_weights(stories260k_dir):
    model = _build_260k(stories260k_dir, torch.float32).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match="groupsize 128 fits no layer"):
        apply_quantization(model, parse_quantize('{"embedding": {}, "linear:int8": {"groupsize": 128}}'), "cpu", cpu_kernels=False)
    assert all(type(t) is torch.Tensor and torch.equal(t, before[k]) for k, t in model.state_dict().items())


# --- random weights of the stories15M shape -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stories15m_state():
    cfg = params_table("stories15M").with_max_seq_len(64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.02)
    return cfg, model.state_dict(), weight_nbytes(model)


def _stories15m(state, dtype: torch.dtype) -> Transformer:
    cfg, sd, _ = state
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, assign=True)
    model = model.to(dtype).eval()
    model.setup_caches(1, 64)
    return model


# recipe, dtype, weight type of every Linear, of the embedding, weight bytes / fp32 bytes at most, max logit error
CASES_15M = {
    "int8": ('{"linear:int8": {}}', torch.bfloat16, "Int8Tensor", "Parameter", 0.55, 0.05),
    "int8-4bit-g32": ('{"linear:int8": {"bitwidth": 4, "groupsize": 32}}', torch.float32,
                      "IntxUnpackedToInt8Tensor", "Parameter", 0.75, 0.4),
    "int4": ('{"linear:int4": {"groupsize": 32}}', torch.bfloat16, "Int4OpaqueTensor", "Parameter", 0.45, 0.4),
    "a8w4dq": ('{"linear:a8w4dq": {"groupsize": 32}}', torch.float32,
               "IntxUnpackedToInt8Tensor", "Parameter", 0.75, 0.4),
    "embedding4": ('{"embedding": {"bitwidth": 4, "groupsize": 32}}', torch.float32, "Parameter",
                   "IntxUnpackedToInt8Tensor", 0.75, 0.4),
    "embedding8+int4": ('{"embedding": {"bitwidth": 8}, "linear:int4": {"groupsize": 32}}', torch.bfloat16,
                        "Int4OpaqueTensor", "IntxUnpackedToInt8Tensor", 0.3, 0.4),
}


@pytest.mark.parametrize("case", list(CASES_15M))
def test_stories15m_shape_scheme_types_bytes_and_closeness(case, stories15m_state):
    recipe, dtype, linear_type, embedding_type, max_bytes_ratio, max_error = CASES_15M[case]
    plan = parse_quantize(recipe)
    assert plan.validate(stories15m_state[0], "cpu", dtype, cpu_kernels=False) == []  # every layer divides: nothing skipped
    tokens, pos = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1)), torch.arange(16)
    fp32_bytes = stories15m_state[2]
    model = _stories15m(stories15m_state, dtype)
    with torch.no_grad():
        ref = model(tokens, pos)
        apply_quantization(model, plan, "cpu", cpu_kernels=False)
        out = model(tokens, pos)
    types = _weight_types(model)
    assert types.pop("tok_embeddings") == embedding_type
    assert set(types.values()) == {linear_type}
    ratio = weight_nbytes(model) / fp32_bytes
    error = _rel_error(out, ref)
    print(f"\n{case}: weight bytes {ratio:.3f} of fp32, relative logit error {error:.4f}")
    assert ratio <= max_bytes_ratio
    assert 0 < error <= max_error
    model.to("cpu")  # quantized tensors survive a device move
    with torch.no_grad():
        assert torch.equal(model(tokens, pos), out)


def test_groupsize_that_skips_layers_still_quantizes_the_rest(stories15m_state):
    # mobile.json: groupsize 256 divides only w2's row (768), not dim 288.
    plan = parse_quantize("mobile.json")
    notes = plan.validate(stories15m_state[0], "cpu", torch.float32, cpu_kernels=False)
    assert notes == ["linear:a8w4dq: 37 layer(s) left unquantized, row length 288 is not a multiple of groupsize 256: "
                     "layers.0.attention.wq, layers.0.attention.wk, layers.0.attention.wv, layers.0.attention.wo "
                     "and 33 more"]
    model = _stories15m(stories15m_state, torch.float32)
    apply_quantization(model, plan, "cpu", cpu_kernels=False)
    quantized = {n for n, t in _weight_types(model).items() if t != "Parameter"}
    assert quantized == {"tok_embeddings", *(f"layers.{i}.feed_forward.w2" for i in range(6))}


# --- torch.export (the AOTI and ExecuTorch exporters start from it) ---------------------------------------


@pytest.mark.parametrize(
    "recipe, dtype",
    [
        ('{"linear:int8": {}}', torch.float32),
        ('{"linear:int8": {"bitwidth": 4, "groupsize": 32}}', torch.float32),
        ('{"linear:int4": {"groupsize": 32}}', torch.bfloat16),
        ('{"embedding": {"bitwidth": 8}, "linear:a8w4dq": {"groupsize": 32}}', torch.float32),
        ('{"embedding": {"bitwidth": 4, "groupsize": 32}, "linear:int8": {}}', torch.bfloat16),
    ],
    ids=["int8", "int8-4bit", "int4", "embedding8+a8w4dq", "embedding4+int8"],
)
def test_quantized_model_exports(recipe, dtype):
    cfg = ModelConfig.from_params(dict(dim=64, hidden_dim=128, n_layers=1, n_heads=4, vocab_size=256, max_seq_len=32))
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype).eval()
    model.setup_caches(1, 32)
    apply_quantization(model, parse_quantize(recipe), "cpu", cpu_kernels=False)
    assert all(t != "Parameter" for t in _weight_types(model).values()) or "embedding" not in recipe
    tokens, pos = torch.tensor([[1, 40, 7, 200]]), torch.arange(4)
    with torch.no_grad():
        eager = model(tokens, pos)
        ep = torch.export.export(model, (tokens, pos), strict=False)
        exported = ep.module()(tokens, pos)
    assert torch.allclose(exported, eager, atol=1e-3, rtol=1e-3)


# --- torch.compile ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, dtype, options",
    [
        ('{"linear:int8": {}}', torch.bfloat16, dict(decode=True)),
        ('{"linear:int4": {"groupsize": 32}}', torch.bfloat16, dict(decode=True, max_autotune=True)),
        ("mobile-32.json", torch.float32, dict(decode=True, prefill=True)),
    ],
    ids=["int8", "int4-max-autotune", "mobile-32+prefill"],
)
def test_compiled_quantized_model_generates_what_eager_does(recipe, dtype, options, stories260k_dir):
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions

    built = _build_260k(stories260k_dir, dtype, recipe)
    prompt = built.tokenizer.encode("Once upon a time", bos=True)
    cfg = GenerationConfig(max_new_tokens=40, sampling=SamplingParams(temperature=0), stop_ids=frozenset())
    eager = list(make_engine(built, max_seq_len=64).tokens(prompt, cfg))
    compiled = list(make_engine(built, CompileOptions(**options), max_seq_len=64).tokens(prompt, cfg))
    assert compiled == eager
