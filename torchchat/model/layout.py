"""Weight layouts that make batch-1 decoding faster in this process, applied to a built model just
before it runs (never to what is saved or exported, whose parameter names stay Meta's).

- wq|wk|wv and w1|w3 stacked into one matrix each: one GEMV instead of three / two per layer; on this
  2-core CPU each GEMV call costs ~10-20 us of dispatch and thread start besides its bytes
  (stories15M, compiled bf16: 8% faster per step, measured side by side; bench/generate_bench.py).
- GGML-packed weights in the kernels' row-interleaved layout (16 rows
  block by block, torchchat/kernels/cpu/csrc/common.h): one register lane per output row, one
  sequential stream per 16 rows; 1.5-2.5x the GEMV speed of the file's row-by-row layout.
- Models with packed weights decode with torchchat_cpu::decode_attention: each step reads the cache
  positions its mask allows, not the whole cache (the matmul over all max_seq_len positions cost a
  third of a stories110M Q4_0 step at 512 positions). In fp32 their KV cache is float16.
- They also run RMSNorm, RoPE (the keys' together with the cache write) and SwiGLU as single native
  passes when eager (torchchat_cpu::rms_norm / rope / kv_update / silu_mul): a stories15M Q4_0 prefill
  spent two thirds of its time in small aten ops around the matrix products.
- On CPU in fp32, the output projection stored transposed (dim x vocab): MKL's GEMV reads that layout
  at about 3x the bandwidth of the row-major (vocab x dim) one for stories15M's 32000 x 288 (measured
  1.2 ms against 3.6 ms); in bf16 the transposed layout is the slow one, so it is left alone.

Plain (unquantized, unsharded) weights are restacked, and GGML-packed ones (torchchat.model.packed) of
one type by appending rows; torchao's packed tensors and tensor-parallel DTensors have layouts of their
own."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class TransposedLinear(nn.Module):
    """y = x @ weight_t, with weight_t = W.T stored contiguously (W: out x in, as nn.Linear keeps it)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight_t)


def _plain(*linears: nn.Module) -> bool:
    return all(
        type(m) is nn.Linear and type(m.weight) is nn.Parameter and type(m.weight.data) is Tensor
        and (m.bias is None or type(m.bias.data) is Tensor)
        for m in linears
    )


def _stack(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing the given ones' outputs, concatenated; their weights are freed as it
    is built, so peak memory grows by one layer at most."""
    first = linears[0]
    out = sum(m.out_features for m in linears)
    with torch.device("meta"):
        stacked = nn.Linear(first.in_features, out, bias=first.bias is not None)
    stacked.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if first.bias is not None:
        stacked.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return stacked


def optimize_for_decode(model: nn.Module) -> list[str]:
    """Restack `model`'s projections in place (see the module docstring). Returns what was done, for
    --verbose; an empty list when nothing applies (quantized, sharded, fused CUDA model, done already)."""
    if getattr(model, "fused_kernels", False) or not hasattr(model, "layers"):
        return []
    from torchchat.model.packed import PackedLinear, stack_packed

    def stacked(linears: list[nn.Module]) -> nn.Module | None:
        if _plain(*linears):
            return _stack(linears)
        if all(type(m) is PackedLinear for m in linears):
            return stack_packed(linears)
        return None

    done = []
    for block in model.layers:
        attn, ff = block.attention, block.feed_forward
        wqkv = stacked([attn.wq, attn.wk, attn.wv]) if attn.wqkv is None else None
        if wqkv is not None:
            attn.wqkv = wqkv
            del attn.wq, attn.wk, attn.wv
            done.append("wqkv")
        w13 = stacked([ff.w1, ff.w3]) if ff.w13 is None else None
        if w13 is not None:
            ff.w13 = w13
            del ff.w1, ff.w3
            done.append("w13")
    from torchchat.model.packed import has_packed, interleave_packed, kernels_unavailable

    if has_packed(model) and kernels_unavailable() is None:
        # The model already needs the native library (its packed layers), so decode attention may use
        # it too; a float model stays free of it (its exports must load without the library).
        if interleave_packed(model):
            done.append("packed weights interleaved")
        for block in model.layers:
            block.attention.native_decode = block.attention.softcap is None  # (soft-capping: its own path)
        done.append("native decode attention")
        for module in model.modules():
            if hasattr(module, "native_ops"):  # RMSNorm, Attention, FeedForward: their eager CPU passes
                module.native_ops = True
        done.append("native eager norms, RoPE and SwiGLU")
        if model.norm.weight.dtype == torch.float32 and hasattr(model, "kv_cache_dtype"):
            # Keys and values in float16, as llama.cpp keeps them by default: each decode step reads half
            # the cache bytes (stories110M at position 144: 5 MB instead of 11 MB, next to 62 MB of
            # weights), and float16 keeps 11 bits of the values (bf16 only 8).
            model.kv_cache_dtype = torch.float16
            done.append("float16 KV cache")
    output = model.output
    tied = getattr(output, "weight", None) is model.tok_embeddings.weight
    if (_plain(output) and not tied and output.bias is None and output.weight.device.type == "cpu"
            and output.weight.dtype == torch.float32):
        model.output = TransposedLinear(output.weight)
        done.append("output transposed")
    return sorted(set(done))
