"""Q4_0 weights kept 4-bit on torchao's int4 kernel: the same weights as the dequantized path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchchat.checkpoint import LoadOptions
from torchchat.checkpoint.gguf import load_gguf
from torchchat.checkpoint.gguf_int4 import int4_kernel_runs, int4_weight
from torchchat.model.config import ModelConfig

from tests.checkpoint.gguf_build import write_llama_gguf
from tests.conftest import needs_cuda


class _Tensor:
    """The two fields of a gguf ReaderTensor that unpack_q4_0 reads."""

    def __init__(self, data, shape):
        self.data, self.shape = data, np.array(list(reversed(shape)))


def test_q4_0_blocks_map_onto_int4_exactly():
    """In float32 the int4 tensor holds exactly the GGUF weight: F.linear with the identity reads it back."""
    from gguf import GGMLQuantizationType, quants

    from torchchat.checkpoint.gguf_tensors import unpack_q4_0

    w = np.random.default_rng(0).standard_normal((172, 128)).astype(np.float32)  # 172 rows: padded to 176
    blocks = quants.quantize(w, GGMLQuantizationType.Q4_0)
    reference = quants.dequantize(blocks, GGMLQuantizationType.Q4_0)
    weight = int4_weight(*unpack_q4_0(_Tensor(blocks, w.shape)), "cpu", torch.float32)
    assert tuple(weight.shape) == w.shape
    read_back = F.linear(torch.eye(128), weight).T
    assert torch.equal(read_back, torch.from_numpy(reference))


def test_kernel_choice():
    assert int4_kernel_runs("cpu", torch.bfloat16)
    assert not int4_kernel_runs("cpu", torch.float32)  # tinygemm's fp32 CPU path is slower than dense
    assert not int4_kernel_runs("mps", torch.bfloat16)


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    from torchchat.model.transformer import Transformer

    config = ModelConfig.from_params(dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                                          multiple_of=32, max_seq_len=64))
    torch.manual_seed(0)
    with torch.no_grad():
        sd = {k: v.detach().clone() for k, v in Transformer(config).state_dict().items()}
        for v in sd.values():
            v.copy_(1.0 + 0.1 * torch.randn_like(v) if v.ndim == 1 else 0.05 * torch.randn_like(v))
    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_0.gguf"
    write_llama_gguf(path, config, sd, kind_of=lambda name, w: "Q4_0" if w.ndim == 2 else "F32")
    return path


def _model(loaded):
    from torchchat.build import load_weights
    from torchchat.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(loaded.config)
    load_weights(model, loaded.state_dict, "q4_0")
    model.to(dtype=torch.bfloat16).eval().requires_grad_(False)
    model.setup_caches(1, 64)
    return model


def test_kept_int4_model_matches_dequantized_model(q4_gguf):
    kept = load_gguf(q4_gguf, LoadOptions(dtype=torch.bfloat16, keep_quantized=True))
    dense = load_gguf(q4_gguf, LoadOptions(dtype=torch.bfloat16, keep_quantized=False))
    wq = kept.state_dict["layers.0.attention.wq.weight"]
    assert type(wq).__name__ == "Int4OpaqueTensor"
    assert type(kept.state_dict["tok_embeddings.weight"]) is torch.Tensor  # a lookup table, dequantized
    assert type(dense.state_dict["layers.0.attention.wq.weight"]) is torch.Tensor

    tokens = torch.tensor([[1, 57, 300, 12, 499, 8, 77, 3]])
    a = _model(kept)(tokens, torch.arange(8))
    b = _model(dense)(tokens, torch.arange(8))
    # bf16 on both sides; the only difference is the bf16 rounding of the fp16 block scales.
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@needs_cuda
def test_q4_0_on_the_cuda_kernel_equals_the_dequantized_weight():
    from gguf import GGMLQuantizationType, quants

    from torchchat.checkpoint.gguf_tensors import unpack_q4_0

    w = np.random.default_rng(1).standard_normal((172, 1120)).astype(np.float32)  # pads to (176, 2048)
    blocks = quants.quantize(w, GGMLQuantizationType.Q4_0)
    codes, scales = unpack_q4_0(_Tensor(blocks, w.shape))
    assert int4_kernel_runs("cuda", torch.bfloat16)
    weight = int4_weight(codes, scales, "cuda", torch.bfloat16)
    assert type(weight).__name__ == "Int4TilePackedTo4dTensor" and tuple(weight.shape) == w.shape
    # The kernel's weight: the fp16 scales rounded to bf16, times (code - 8).
    expected = (torch.from_numpy(scales).bfloat16().float().repeat_interleave(32, dim=1)
                * (torch.from_numpy(codes).float() - 8)).cuda()
    x = torch.randn(5, 1120, device="cuda").bfloat16()
    got = F.linear(x, weight).float()
    want = x.float() @ expected.T
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
