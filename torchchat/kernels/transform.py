"""Turn a Transformer whose weights are on the meta device or in (memory-mapped) CPU memory into the
fused CUDA model, one weight matrix at a time.

Each original matrix is fetched onto the GPU, written (quantized, when the plan says so) into the
rows of its fused matrix, and released before the next is fetched. The GPU therefore never holds more
than the finished part of the fused model plus one original matrix and a bounded quantization
scratch: peak memory stays close to the final model size instead of the full-precision model's.

Integer formats fold the RMSNorm weight that precedes a layer into its columns before quantizing
(W diag(g), the norm module then holding ones), so their kernels need no per-input norm arithmetic.

GGUF block-quantized weights (a `BlockSource`) are transcoded instead (gguf_transcode.py): their codes
kept, never quantized again, so their norms are not folded (the kernels apply the norm weight to the
input). That includes the token embedding (FusedEmbedding; a tied output then multiplies by the same
storage). A stack whose parts are not all such blocks (an F16 matrix beside a Q4_0 one) is built in
float from the dequantized blocks, and said so in the notes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from torchchat.kernels.formats import LinearQuant
from torchchat.kernels.gguf_transcode import GGMLBlocks, fused_format, scale_dtype, transcodable
from torchchat.kernels.modules import (
    FusedAttention, FusedBlock, FusedEmbedding, FusedFeedForward, FusedLinear, FusedRMSNorm,
)
from torchchat.model.config import ModelConfig
from torchchat.model.transformer import RMSNorm, Transformer

# name of an original parameter -> that tensor on the target device, in the model dtype
WeightSource = Callable[[str], Tensor]
# name of an original parameter -> its GGUF blocks (on any device), or None where it is not block-quantized
BlockSource = Callable[[str], "GGMLBlocks | None"]


class _Builder:
    def __init__(self, cfg: ModelConfig, source: WeightSource, quant: LinearQuant | None, dtype, device,
                 blocks: BlockSource | None = None):
        self.cfg, self.source, self.quant = cfg, source, quant
        self.blocks = blocks or (lambda name: None)
        self.dtype, self.device = dtype, device
        self.unquantized: list[str] = []
        self.transcoded: list[str] = []  # "Q4_K -> int4 g32" per transcoded layer
        self.dequantized: list[str] = []  # layers whose GGUF blocks went to float (mixed with float parts)

    def transcoded_linear(self, names: list[str], rows: list[int], in_features: int, label: str,
                          out_dtype: torch.dtype | None) -> FusedLinear | None:
        """The fused layer made of the GGUF blocks of `names`, or None where not every part is such blocks
        (those parts then load as float)."""
        found = [self.blocks(name) for name in names]
        if not all(b is not None and transcodable(b.qtype) for b in found):
            if any(b is not None for b in found):
                self.dequantized.append(label)
            return None
        fmt, groupsize = fused_format([b.qtype for b in found])
        lin = FusedLinear(sum(rows), in_features, fmt, groupsize, self.dtype, self.device, out_dtype,
                          scale_dtype=scale_dtype(self.dtype))
        row0 = 0
        for name, n, b in zip(names, rows, found):
            if (b.rows, b.in_features) != (n, in_features):
                raise ValueError(f"{name}: expected shape {(n, in_features)}, got {(b.rows, b.in_features)}")
            lin.fill_blocks(row0, b)
            row0 += n
        types = "+".join(sorted({b.name for b in found}))
        self.transcoded.append(f"{types} -> {fmt} g{groupsize}" + (f" ({label})" if "+" in types else ""))
        return lin

    def linear(self, names: list[str], rows: list[int], in_features: int, label: str,
               out_dtype: torch.dtype | None = None, norm: str | None = None) -> FusedLinear:
        """Stack the original weights `names` (with `rows` rows each) into one fused layer. `norm`: the
        RMSNorm weight applied to this layer's input; an integer format folds it into the weight's
        columns (quantizing W diag(g)), so its kernel only scales by 1/rms (see gemv's NORM modes).
        GGUF blocks are transcoded instead (their norm is not folded)."""
        lin = self.transcoded_linear(names, rows, in_features, label, out_dtype)
        if lin is not None:
            return lin
        fmt, groupsize = "float", 0
        if self.quant is not None:
            if self.quant.fits(in_features):
                fmt, groupsize = self.quant.kind, self.quant.groupsize
            else:
                self.unquantized.append(label)
        lin = FusedLinear(sum(rows), in_features, fmt, groupsize, self.dtype, self.device, out_dtype)
        g = self.source(norm) if norm is not None and fmt != "float" else None
        lin.norm_folded = g is not None
        row0 = 0
        for name, n in zip(names, rows):
            w = self.source(name)
            if w.shape != (n, in_features):
                raise ValueError(f"{name}: expected shape {(n, in_features)}, got {tuple(w.shape)}")
            lin.fill(row0, w, col_scale=g)
            row0 += n
            del w
        return lin

    def norm(self, name: str, folded: bool, cls=RMSNorm) -> RMSNorm:
        """The RMSNorm module; all ones when its weight was folded into the next layer."""
        with torch.device("meta"):
            norm = cls(self.cfg.dim, self.cfg.norm_eps)
        weight = self.source(name)
        if folded:
            weight = torch.ones_like(weight)
        norm.weight = nn.Parameter(weight, requires_grad=False)
        return norm

    def block(self, i: int) -> FusedBlock:
        cfg, p = self.cfg, f"layers.{i}."
        nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        wqkv = self.linear([p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"],
                           [nq, nkv, nkv], cfg.dim, "wq/wk/wv", norm=p + "attention_norm.weight")
        wo = self.linear([p + "attention.wo.weight"], [cfg.dim], nq, "wo")
        w13 = self.linear([p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"],
                          [cfg.hidden_dim, cfg.hidden_dim], cfg.dim, "w1/w3", norm=p + "ffn_norm.weight")
        w2 = self.linear([p + "feed_forward.w2.weight"], [cfg.dim], cfg.hidden_dim, "w2")
        return FusedBlock(cfg, FusedAttention(cfg, wqkv, wo), FusedFeedForward(w13, w2),
                          self.norm(p + "attention_norm.weight", wqkv.norm_folded),
                          self.norm(p + "ffn_norm.weight", w13.norm_folded))


def fuse_model(model: Transformer, source: WeightSource, quant: LinearQuant | None,
               device: torch.device | str, dtype: torch.dtype, blocks: BlockSource | None = None) -> list[str]:
    """Replace `model`'s blocks, final norm and output projection by fused modules built from
    `source`, in place, and put the embedding on the device. `blocks`: the weights that are GGUF
    blocks, transcoded rather than read from `source` (which must still give them as float, for
    stacks mixing them with float weights). Returns notes for the user (layers the
    quantization had to leave in the model dtype, what the GGUF blocks became)."""
    cfg: ModelConfig = model.config
    b = _Builder(cfg, source, quant, dtype, device, blocks)
    # GGUF blocks stay integer in the embedding too (rows dequantized as they are looked up), and a
    # tied output multiplies by the same storage; otherwise a plain lookup table, whatever module held
    # the checkpoint's.
    table = b.transcoded_linear(["tok_embeddings.weight"], [cfg.vocab_size], cfg.dim, "tok_embeddings",
                                out_dtype=torch.float32)
    if table is not None:
        model.tok_embeddings = FusedEmbedding(table)
    else:
        model.tok_embeddings = nn.Embedding.from_pretrained(source("tok_embeddings.weight"), freeze=True)
    # The output projection first: its full-precision original (vocabulary x dim, the largest
    # matrix) is then the only thing on the GPU besides the embedding.
    if cfg.tie_embeddings:
        model.output = table if table is not None else FusedLinear.sharing(model.tok_embeddings.weight,
                                                                           out_dtype=torch.float32)
        if quant is not None:
            b.unquantized.append("output (tied to the embedding)")
    else:
        model.output = b.linear(["output.weight"], [cfg.vocab_size], cfg.dim, "output", out_dtype=torch.float32,
                                norm="norm.weight")
    model.norm = b.norm("norm.weight", model.output.norm_folded, FusedRMSNorm)
    for i in range(cfg.n_layers):
        model.layers[i] = b.block(i)
        if torch.device(device).type == "cuda":
            # Hand the block's scratch back to the driver: cached blocks of the originals' sizes
            # would otherwise fragment the allocator's pool and raise the reserved peak.
            torch.cuda.empty_cache()
    model.fused_kernels = True
    notes = []
    dt = str(dtype).removeprefix("torch.")
    if b.transcoded:
        counts = {kind: b.transcoded.count(kind) for kind in b.transcoded}
        sdt = str(scale_dtype(dtype)).removeprefix("torch.")
        notes.append(f"GGUF blocks kept integer on the fused path (codes unchanged, {sdt} scales): "
                     + ", ".join(f"{kind} x{n}" for kind, n in counts.items()))
    if b.dequantized:
        kinds = sorted(set(b.dequantized), key=b.dequantized.index)
        notes.append(f"GGUF blocks dequantized to {dt} (stacked with float weights): {', '.join(kinds)}")
    if b.unquantized:
        kinds = sorted(set(b.unquantized), key=b.unquantized.index)
        notes.append(f"fused {quant.kind} groupsize {quant.groupsize}: left in {str(dtype).removeprefix('torch.')} "
                     f"(row length not a multiple of the group): {', '.join(kinds)}")
    return notes
