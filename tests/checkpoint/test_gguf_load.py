"""GGUF loading: every supported tensor type dequantizes to within its error of the source weights; the
config comes from the metadata; unsupported content fails with an error that names it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchchat.checkpoint.gguf import load_gguf
from torchchat.errors import CheckpointError
from torchchat.model.config import ModelConfig

from tests.checkpoint.gguf_build import pack_k_quant, write_llama_gguf

KINDS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K", "Q5_K"]


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    # Rows of 256 so that the K-quants (256-element super-blocks) apply to every matrix.
    return ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=512,
                       max_seq_len=64, rope_base=500000.0)


@pytest.fixture(scope="module")
def weights(config) -> dict[str, torch.Tensor]:
    from torchchat.model.transformer import Transformer

    torch.manual_seed(0)
    with torch.no_grad():
        sd = {k: v.detach().clone() for k, v in Transformer(config).state_dict().items()}
        for k, v in sd.items():
            v.copy_(1.0 + 0.1 * torch.randn_like(v) if v.ndim == 1 else 0.05 * torch.randn_like(v))
    return sd


def _blocks(w: np.ndarray, size: int) -> np.ndarray:
    return w.reshape(w.shape[0], -1, size)


def error_bound(kind: str, w: np.ndarray) -> np.ndarray:
    """Largest error each element may have in `kind`: one quantization step of its block (rounding gives
    half a step; clamping at the edge of Q4_0/Q5_0's signed range a whole one), plus the fp16 rounding of
    the block scale (2^-11 of it, times at most 2^7 levels: the 2^-4 margin), or the float format's
    rounding."""
    if kind == "F32":
        return np.zeros_like(w)
    if kind == "F16":
        return np.abs(w) * 2.0**-11 + 2.0**-24
    if kind == "BF16":
        return np.abs(w) * 2.0**-8
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        return pack_k_quant(w, kind)[2] / 2 + 1e-7
    b = _blocks(w, 32)
    amax, rng = np.abs(b).max(-1, keepdims=True), b.max(-1, keepdims=True) - b.min(-1, keepdims=True)
    step = {"Q8_0": amax / 127, "Q4_0": amax / 8, "Q5_0": amax / 16, "Q4_1": rng / 15, "Q5_1": rng / 31}[kind]
    return np.broadcast_to(step * (1 + 2.0**-4), b.shape).reshape(w.shape) + 1e-7


@pytest.mark.parametrize("kind", KINDS)
def test_each_type_dequantizes_within_its_error(tmp_path, config, weights, kind):
    path = tmp_path / f"tiny-{kind}.gguf"
    write_llama_gguf(path, config, weights, kind_of=lambda name, w: kind if w.ndim == 2 else "F32")
    loaded = load_gguf(path)
    assert loaded.format == "gguf" and loaded.tokenizer is None
    assert set(loaded.state_dict) == set(weights)
    for name, source in weights.items():
        got = loaded.state_dict[name].float()
        assert got.shape == source.shape, name
        w = source.numpy()
        err = np.abs(got.numpy() - w)
        kind_here = kind if w.ndim == 2 else "F32"
        assert (err <= error_bound(kind_here, w)).all(), f"{name}: max error {err.max()}"
        if kind_here in ("Q4_K", "Q5_K", "Q6_K"):  # the blocks' own values, exactly: the unpacking is right
            assert np.array_equal(got.numpy(), pack_k_quant(w, kind_here)[1]), name
    if kind not in ("F32", "F16", "BF16"):
        some = weights["layers.0.attention.wq.weight"].numpy()
        assert np.abs(loaded.state_dict["layers.0.attention.wq.weight"].numpy() - some).max() > 0  # really quantized


def test_dequantizes_to_the_requested_dtype(tmp_path, config, weights):
    from torchchat.checkpoint import LoadOptions

    path = tmp_path / "q8.gguf"
    write_llama_gguf(path, config, weights, kind_of=lambda name, w: "Q8_0" if w.ndim == 2 else "F32")
    loaded = load_gguf(path, LoadOptions(dtype=torch.bfloat16, keep_quantized=True))  # no Q4_0 here: dense
    assert loaded.state_dict["layers.1.feed_forward.w2.weight"].dtype == torch.bfloat16
    assert type(loaded.state_dict["layers.1.feed_forward.w2.weight"]) is torch.Tensor


def test_config_comes_from_the_metadata(tmp_path, config, weights):
    path = tmp_path / "m.gguf"
    tied = {k: v for k, v in weights.items() if k != "output.weight"}
    write_llama_gguf(path, config, tied, metadata={"llama.context_length": 4096, "llama.rope.freq_base": 1e6,
                                                   "llama.attention.layer_norm_rms_epsilon": 1e-6})
    got = load_gguf(path).config
    assert (got.dim, got.n_layers, got.n_heads, got.n_kv_heads, got.hidden_dim, got.vocab_size) == (256, 2, 4, 2, 512, 256)
    assert got.max_seq_len == 4096 and got.rope_base == 1e6 and got.norm_eps == pytest.approx(1e-6)
    assert got.tie_embeddings and got.rope_scaling is None


def test_llama3_rope_scaling_matches_transformers(tmp_path, config, weights):
    """llama.cpp stores Llama 3.1+ rope scaling as `rope_freqs` (base frequency / scaled frequency); the
    recovered scaling must give transformers' llama3 frequencies."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from torchchat.model.rope import scaled_frequencies

    head_dim, base = 128, 500000.0
    hf_config = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
        rope_parameters={"rope_type": "llama3", "rope_theta": base, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    rope_freqs = (plain / scaled.double()).float().numpy()
    cfg = ModelConfig(dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=512, max_seq_len=64,
                      rope_base=base)
    small = {k: v for k, v in weights.items() if "layers" not in k}  # shapes do not matter for the config
    small["tok_embeddings.weight"] = torch.zeros(256, 512)
    path = tmp_path / "llama31.gguf"
    write_llama_gguf(path, cfg, small, extra_tensors={"rope_freqs.weight": rope_freqs},
                     metadata={"llama.block_count": 2, "llama.feed_forward_length": 512})
    got = load_gguf(path).config
    assert got.rope_scaling is not None and got.rope_scaling.factor == pytest.approx(32.0)
    ours = scaled_frequencies(plain, got.rope_scaling)
    torch.testing.assert_close(ours, scaled.double(), rtol=1e-5, atol=0)


def test_unsupported_architecture_is_named(tmp_path, config, weights):
    path = tmp_path / "falcon.gguf"
    write_llama_gguf(path, config, weights, arch="falcon")
    with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported"):
        load_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path, config, weights):
    from gguf import GGMLQuantizationType

    raw = np.random.default_rng(0).integers(0, 255, size=(256, 84), dtype=np.uint8)  # Q2_K: 84 bytes / 256
    path = tmp_path / "q2k.gguf"
    rest = {k: v for k, v in weights.items() if k != "layers.0.attention.wq.weight"}
    write_llama_gguf(path, config, rest, extra_tensors={"blk.0.attn_q.weight": (raw, GGMLQuantizationType.Q2_K)})
    with pytest.raises(CheckpointError, match=r"Q2_K \(e\.g\. 'blk\.0\.attn_q\.weight'\) are not supported"):
        load_gguf(path)


def test_unknown_tensor_names_are_an_error(tmp_path, config, weights):
    path = tmp_path / "extra.gguf"
    write_llama_gguf(path, config, weights, extra_tensors={"blk.0.attn_qkv.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"unknown GGUF tensor name\(s\) blk\.0\.attn_qkv\.weight"):
        load_gguf(path)


def test_mixture_of_experts_is_refused(tmp_path, config, weights):
    path = tmp_path / "moe.gguf"
    write_llama_gguf(path, config, weights, metadata={"llama.expert_count": 8})
    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        load_gguf(path)


def test_vocabulary_only_file_is_not_a_model():
    from tests.conftest import shared_path

    with pytest.raises(CheckpointError, match="vocabulary-only"):
        load_gguf(shared_path("tokenizers", "llama.cpp-vocab-tests", "ggml-vocab-llama-spm.gguf"))
