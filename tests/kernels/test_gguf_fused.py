"""A GGUF model of mixed block types (as a Q4_K_M file mixes Q4_K and Q6_K) built on the fused path from
its blocks, the way `--device cuda` builds it, here on the CPU through Triton's interpreter (on the GPU
where there is one): which format each layer gets, that the weights stay integer at about the file's
size, and that its logits, prefill and one-token decode steps, are those of the plain Transformer
holding gguf's own dequantization of the file. tests/kernels/test_cuda_gguf.py runs the same through build_model on a GPU."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from tests.checkpoint.gguf_build import random_weights, write_llama_gguf  # noqa: E402
from tests.kernels.numerics import rel_err  # noqa: E402
from torchchat import build  # noqa: E402
from torchchat.checkpoint import LoadOptions  # noqa: E402
from torchchat.checkpoint.gguf import load_gguf  # noqa: E402
from torchchat.kernels.modules import FusedEmbedding  # noqa: E402
from torchchat.kernels.transform import fuse_model  # noqa: E402
from torchchat.model.config import ModelConfig  # noqa: E402
from torchchat.model.transformer import Transformer  # noqa: E402

# Layer 0 like a Q4_K_M file's "more bits" layers (Q6_K wv and w2), layer 1 all Q4_K; a Q8_0 output
# and a Q4_0 embedding.
TYPES = {
    "layers.0.attention.wv.weight": "Q6_K", "layers.0.feed_forward.w2.weight": "Q6_K",
    "output.weight": "Q8_0", "tok_embeddings.weight": "Q4_0",
}


def _config(tied: bool) -> ModelConfig:
    cfg = ModelConfig.from_params(dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512,
                                       max_seq_len=64))
    return replace(cfg, tie_embeddings=tied)


def _write(path, tied: bool):
    config = _config(tied)
    sd = random_weights(config)
    write_llama_gguf(path, config, sd, kind_of=lambda name, w: TYPES.get(name, "Q4_K") if w.ndim == 2 else "F32")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused-gguf")
    return {tied: _write(folder / f"mixed-{tied}.gguf", tied) for tied in (False, True)}


def _fused(path, dtype, device):
    """What build.materialize does on CUDA, on the CPU: blocks kept at load, transcoded by fuse_model."""
    weights = load_gguf(path, LoadOptions(dtype=dtype, keep_quantized=True, tokenizer=False,
                                          keep_blocks=lambda config: True))
    assert weights.packed and all(t.dtype == torch.uint8 for n, t in weights.state_dict.items() if n in weights.packed)
    with torch.device("meta"):
        model = Transformer(weights.config)
    build._assign(model, weights, str(path))
    floats = build._real_tensor(model, device, dtype)
    source, blocks = build._block_sources(model, weights.packed, floats, device, dtype)
    with torch.no_grad():
        notes = fuse_model(model, source, None, device, dtype, blocks)
    return model.eval(), notes


def _dequantized(path, device):
    dense = load_gguf(path, LoadOptions(dtype=torch.float32, tokenizer=False))
    with torch.device("meta"):
        model = Transformer(dense.config)
    build.load_weights(model, dense.state_dict, str(path))
    return model.to(device).eval()


def _bytes(lin) -> int:
    return sum(t.numel() * t.element_size() for t in (lin.weight, lin.scales, lin.mins) if t is not None)


def _logits(model, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Prefill `prompt` (PyTorch ops), then one token at a time (the fused kernels): the logits of each
    position, (len(prompt) + len(steps), vocab)."""
    model.setup_caches(1, 64)
    device = model.norm.weight.device
    with torch.no_grad():
        out = [model(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device))[0]]
        for i, tok in enumerate(steps):
            out.append(model(torch.tensor([[tok]], device=device), torch.tensor([len(prompt) + i], device=device))[0])
    return torch.cat(out).float()


def test_each_layer_takes_the_format_of_its_blocks(files, device):
    model, notes = _fused(files[False], torch.bfloat16, device)
    l0, l1 = model.layers
    assert (l0.attention.wqkv.fmt, l0.attention.wqkv.groupsize) == ("int8_asym", 16)  # Q4_K q, k beside a Q6_K v
    assert (l1.attention.wqkv.fmt, l1.attention.wqkv.groupsize) == ("int4", 32)
    assert (l0.feed_forward.w13.fmt, l0.feed_forward.w2.fmt, l0.feed_forward.w2.groupsize) == ("int4", "int8", 16)
    assert (model.output.fmt, model.output.groupsize) == ("int8", 32)
    # The file's fp16 scales stay fp16 in a bf16 model (exact for Q4_0/Q8_0; the kernels read any float).
    assert l0.attention.wqkv.scales.dtype == l0.attention.wqkv.mins.dtype == torch.float16
    assert l1.attention.wqkv.weight.dtype == torch.int32 and l0.attention_norm.weight.dtype == torch.bfloat16
    # Not re-quantized, so the norms are not folded into the weights: they keep their own weights.
    assert not l0.attention.wqkv.norm_folded and not bool((l0.ffn_norm.weight == 1).all())
    assert any("GGUF blocks kept integer on the fused path (codes unchanged, float16 scales)" in n
               and "Q4_K+Q6_K -> int8_asym g16 (wq/wk/wv)" in n for n in notes), notes
    assert any("Q4_0 -> int4 g32 x1" in n for n in notes), notes  # the embedding
    assert type(model.tok_embeddings) is FusedEmbedding and model.tok_embeddings.table.fmt == "int4"


def test_weights_stay_integer_near_the_file_size(files, device):
    """No float matrix, the embedding included; each layer's bytes are what the format table in
    gguf_transcode.py says: 5 bits/weight for Q4_K (4.5 in the file), 9 for Q6_K (6.5625), 8.5 for Q8_0."""
    from gguf import GGUFReader

    from tests.checkpoint.gguf_build import gguf_name

    model, _ = _fused(files[False], torch.bfloat16, device)
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(files[False]).tensors}
    cfg = model.config
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        for lin, names in ((block.attention.wqkv, ["attention.wq", "attention.wk", "attention.wv"]),
                           (block.attention.wo, ["attention.wo"]),
                           (block.feed_forward.w13, ["feed_forward.w1", "feed_forward.w3"]),
                           (block.feed_forward.w2, ["feed_forward.w2"])):
            ours = _bytes(lin)
            bits = {"int4": 5.0, "int8": 8 + 16 / lin.groupsize, "int8_asym": 8 + 32 / lin.groupsize}[lin.fmt]
            assert ours == lin.out_features * lin.in_features * bits / 8
            file = sum(sizes[gguf_name(p + n + ".weight")] for n in names)
            # A mixed stack takes int8 for its Q4_K parts too.
            assert ours <= (2.0 if lin.fmt == "int8_asym" else 1.45) * file
    weights = [n for n, t in model.named_parameters() if n.endswith("weight") and t.dim() == 2]
    assert weights and not [n for n in weights if model.get_parameter(n).is_floating_point()]
    table = model.tok_embeddings.table
    assert _bytes(table) == cfg.vocab_size * cfg.dim * 5 // 8 <= 1.12 * sizes["token_embd.weight"]  # Q4_0: 4.5 bits


def test_logits_match_the_dequantized_file(files, device):
    """fp32 keeps every scale exactly, so the fused model is the dequantized file's model: logits agree
    to float32 summation order, at prefill (PyTorch on the dequantized storage) and at each decode step
    (the GEMV kernels on the integers)."""
    prompt, steps = [1, 57, 300, 12], [499, 8]
    fused, _ = _fused(files[False], torch.float32, device)
    want = _logits(_dequantized(files[False], device), prompt, steps)
    got = _logits(fused, prompt, steps)
    assert rel_err(got, want) < 1e-5


def test_tied_output_multiplies_by_the_embedding_table(files, device):
    model, _ = _fused(files[True], torch.float32, device)
    assert model.output is model.tok_embeddings.table and model.output.fmt == "int4"
    assert model.output.weight is model.tok_embeddings.weight  # held once, as in the file
    prompt = [3, 1, 4, 1, 5]
    assert rel_err(_logits(model, prompt, [9]), _logits(_dequantized(files[True], device), prompt, [9])) < 1e-5


def test_blocks_are_kept_only_where_asked(files):
    """keep_blocks says no (the fused path will not run): the file loads dense as before; and blocks kept
    for a path not taken after all become the same dense weights (build._dequantize_blocks)."""
    no = load_gguf(files[False], LoadOptions(keep_quantized=True, tokenizer=False, keep_blocks=lambda config: False))
    assert no.packed == {} and all(t.is_floating_point() for t in no.state_dict.values())
    kept = load_gguf(files[False], LoadOptions(keep_quantized=True, tokenizer=False, keep_blocks=lambda config: True))
    build._dequantize_blocks(kept, torch.float32)
    assert kept.packed == {}
    for name, t in no.state_dict.items():
        assert torch.equal(kept.state_dict[name], t.float()), name


def test_size_check_counts_blocks_at_their_size(monkeypatch):
    """A GGUF model kept as blocks is not refused for the memory its bf16 weights would take: a
    machine holding 1.3 bytes a weight fits it (at most 10 bits a weight transcoded), not bf16's 2."""
    import torchchat.model.params_check as params_check
    from torchchat.build import BuildSpec, ModelSource
    from torchchat.errors import UserInputError
    from torchchat.model.params_check import weight_count

    config = _config(False)
    monkeypatch.setattr(params_check, "machine_bytes", lambda device: int(1.3 * weight_count(config)))
    spec = BuildSpec(ModelSource(gguf_path="m.gguf"), dtype=torch.bfloat16)
    build._check_model_fits(config, spec, "cpu", "m.gguf", blocks=True)
    with pytest.raises(UserInputError, match="needs about"):
        build._check_model_fits(config, spec, "cpu", "m.gguf", blocks=False)


def test_decode_batch_matches_the_dequantized_file(files, device):
    """A decode batch (the server's batched engine: a position and a cache row per sequence, one row
    idle) on the multi-row kernels, over the transcoded formats with their norms applied in the kernel."""
    prompts = [[1, 57, 300, 12], [7, 9]]

    def batch_step(model, idle):
        model.setup_caches(3, 64)
        dev = model.norm.weight.device
        with torch.no_grad():
            for r, p in enumerate(prompts):
                model(torch.tensor([p], device=dev), torch.arange(len(p), device=dev), r)
            pos = torch.tensor([[len(prompts[0])], [len(prompts[1])], [idle]], device=dev)
            return model(torch.tensor([[499], [8], [0]], device=dev), pos)[:2, 0]

    fused, _ = _fused(files[False], torch.float32, device)
    assert rel_err(batch_step(fused, -1), batch_step(_dequantized(files[False], device), 63)) < 1e-5
