"""Fused modules that replace the Transformer's blocks, final norm and output projection on CUDA.

Decoding one token (batch 1) runs five kernels per layer:
  GEMV [RMSNorm -> q|k|v]  ->  attention [RoPE, KV-cache write, softmax(qK)V]  ->
  GEMV [wo, + residual]  ->  GEMV [RMSNorm -> silu(w1 x) * (w3 x)]  ->  GEMV [w2, + residual]
A decode batch (B sequences, one token each: x (B, 1, dim), positions (B, 1), what the batched engine
feeds) runs the same five kernels, their multi-row forms: each GEMV reads a weight tile once for all
rows (gemv_rows.py), attention has a program per row at that row's position and cache row.
Longer inputs (prefill) run the same math as torchchat.model.transformer with PyTorch ops on the
(dequantized) weights, so prompts of any length work and fill the same KV cache, in any cache row.

The modules keep the attribute names the Transformer relies on (`attention.kv_cache`, `norm.weight`,
`output.weight`), so `Transformer.setup_caches` and `forward` work unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchchat.kernels import dequant
from torchchat.kernels.attention import attention_decode
from torchchat.kernels.formats import dequantize, empty_storage, quantize_into
from torchchat.kernels.gemv import gemv
from torchchat.kernels.gemv_rows import gemv_rows
from torchchat.kernels.gguf_transcode import GGMLBlocks, transcode_into
from torchchat.kernels.norm import rmsnorm
from torchchat.model.config import ModelConfig
from torchchat.model.kv_cache import KVCache
from torchchat.model.rope import apply_rope
from torchchat.model.transformer import RMSNorm


# Weights dequantized at a time for inputs of several rows (prefill): 16 MB of bf16 scratch, 64 MB on
# a GPU (a 7B prefill is then ~200 slices of three launches each, instead of ~800).
_DEQUANT_ELEMENTS = {"cuda": 1 << 25}
_DEQUANT_ELEMENTS_DEFAULT = 1 << 23


def _dequantize(fmt: str, groupsize: int, weight: Tensor, scales: Tensor | None, mins: Tensor | None,
                dtype: torch.dtype) -> Tensor:
    """formats.dequantize, by one Triton kernel for integer formats on CUDA (dequant.py says why)."""
    if weight.is_cuda and fmt != "float":
        return dequant.dequantize(fmt, groupsize, weight, scales, mins, dtype)
    return dequantize(fmt, groupsize, weight, scales, mins, dtype)


# Most rows a decode batch runs through the multi-row kernels; more (never from the engine, whose
# buckets stop at its slots) take the prefill path. Past 16 rows each further 16 read the weights again.
MAX_DECODE_ROWS = 64


# Prefill chunks of at most this many tokens (all rows together) take the multi-row kernels, per
# weight format, instead of dequantizing every weight to the model dtype first: on the H100 a 7B int4
# prefill costs ~52 ms whatever its length (the dequantization), the one-dot int4 kernel ~9.5 ms per 16
# rows (each further 16 read the weights again), so up to 48 tokens it is the cheaper path. CUDA only:
# on the CPU the fused path's prefill runs PyTorch's GEMM on dequantized weights.
SHORT_PREFILL_ROWS = {"int4": 48}
_SHORT_PREFILL_DEVICES = ("cuda",)


def _short_prefill_rows(x: Tensor, lin: "FusedLinear") -> int:
    """The rows of x (..., K) when the multi-row kernels should multiply them by lin (see
    SHORT_PREFILL_ROWS), else 0."""
    limit = SHORT_PREFILL_ROWS.get(lin.fmt, 0)
    rows = x.numel() // x.shape[-1]
    return rows if limit and x.device.type in _SHORT_PREFILL_DEVICES and 1 < rows <= limit else 0


def _is_one_row(x: Tensor) -> bool:
    return x.numel() == x.shape[-1] and x.is_contiguous()


def _decode_rows(x: Tensor) -> int:
    """The rows of a decode batch x (B, 1, dim) (contiguous, B <= MAX_DECODE_ROWS), else 0."""
    if x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_DECODE_ROWS and x.is_contiguous():
        return x.shape[0]
    return 0


class FusedLinear(nn.Module):
    """A bias-free linear layer whose weight is stored in a fused-path format (formats.py), possibly
    several original layers stacked by rows (e.g. wq|wk|wv). Parameters: `weight` and, for integer
    formats, `scales` (and `mins` for int4); none of them trains."""

    def __init__(self, out_features: int, in_features: int, fmt: str, groupsize: int, dtype: torch.dtype,
                 device, out_dtype: torch.dtype | None = None, scale_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.groupsize = fmt, groupsize
        self.dtype = dtype  # the model dtype (activations; scales unless `scale_dtype` says otherwise)
        self.out_dtype = out_dtype  # dtype of a one-row result (None: the model dtype)
        self.norm_folded = False  # the preceding RMSNorm's weight is folded into this weight (transform.py)
        for name, t in empty_storage(fmt, out_features, in_features, groupsize, dtype, device, scale_dtype).items():
            setattr(self, name, nn.Parameter(t, requires_grad=False))
        if fmt not in ("int4", "int8_asym"):
            self.mins = None
        if fmt == "float":
            self.scales = None

    @classmethod
    def sharing(cls, weight: nn.Parameter, out_dtype: torch.dtype | None = None) -> "FusedLinear":
        """A float-format layer over an existing parameter (an output projection tied to the embedding)."""
        with torch.device("meta"):
            lin = cls(weight.shape[0], weight.shape[1], "float", 0, weight.dtype, "meta", out_dtype)
        lin.weight = weight
        return lin

    def _storage(self) -> dict[str, Tensor]:
        storage = {"weight": self.weight.data}
        if self.scales is not None:
            storage["scales"] = self.scales.data
        if self.mins is not None:
            storage["mins"] = self.mins.data
        return storage

    def fill(self, row0: int, w: Tensor, col_scale: Tensor | None = None) -> None:
        """Store original weight rows w (r, in_features) at rows [row0, row0 + r), scaled per input
        column by `col_scale` when given."""
        with torch.no_grad():
            quantize_into(self._storage(), self.fmt, self.groupsize, row0, w, col_scale)

    def fill_blocks(self, row0: int, blocks: GGMLBlocks) -> None:
        """Store a GGUF tensor's rows at rows [row0, row0 + rows), their codes kept (gguf_transcode.py)."""
        with torch.no_grad():
            transcode_into(self._storage(), self.fmt, self.groupsize, row0, blocks)

    def dequantized(self, rows: slice = slice(None)) -> Tensor:
        """The weight rows this layer stands for, in the model dtype (prefill and reference math)."""
        if self.fmt == "float":
            return self.weight[rows]
        mins = self.mins[rows] if self.mins is not None else None
        return _dequantize(self.fmt, self.groupsize, self.weight[rows], self.scales[rows], mins, self.dtype)

    def linear(self, x: Tensor, rows: slice = slice(None)) -> Tensor:
        """F.linear over a row range of the stored weight, as the unfused layer for those rows computes.
        Integer formats are dequantized a block of rows at a time, bounding the scratch memory."""
        if self.fmt == "float":
            return F.linear(x, self.weight[rows])
        start, stop, _ = rows.indices(self.out_features)
        out = torch.empty(*x.shape[:-1], stop - start, dtype=x.dtype, device=x.device)
        step = max(1, _DEQUANT_ELEMENTS.get(x.device.type, _DEQUANT_ELEMENTS_DEFAULT) // self.in_features)
        for a in range(start, stop, step):
            b = min(a + step, stop)
            out[..., a - start : b - start] = F.linear(x, self.dequantized(slice(a, b)))
        return out

    def gemv(self, x: Tensor, norm: RMSNorm | None = None, **fused) -> Tensor:
        """Product with optional fused prologue/epilogue (see torchchat.kernels.gemv.gemv): one row for
        x (K,) (-> (N,)), or each row of x (M, K) (-> (M, N), torchchat.kernels.gemv_rows);
        `norm`: the RMSNorm module applied to x first (only 1/rms when its weight is folded in)."""
        if norm is not None:
            fused.update(eps=norm.eps, norm_weight=None if self.norm_folded else norm.weight, rms_only=self.norm_folded)
        if x.dim() == 2:
            return gemv_rows(x, self.fmt, self.groupsize, self.weight, self.scales, self.mins, **fused)
        return gemv(x.view(-1), self.fmt, self.groupsize, self.weight, self.scales, self.mins, **fused)

    def forward(self, x: Tensor) -> Tensor:
        if _is_one_row(x):
            y = self.gemv(x, out_dtype=self.out_dtype)
            return y.view(*x.shape[:-1], self.out_features)
        rows = _decode_rows(x)
        if rows:
            y = self.gemv(x.view(rows, self.in_features), out_dtype=self.out_dtype)
            return y.view(rows, 1, self.out_features)
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, groupsize={self.groupsize}"


class FusedEmbedding(nn.Module):
    """A token embedding whose table is a FusedLinear's integer storage (a GGUF file's blocks,
    transcoded): the looked-up rows are dequantized, nothing else. With tied embeddings the same
    FusedLinear is the output projection, so the table is held once, as in the file."""

    def __init__(self, table: FusedLinear):
        super().__init__()
        self.table = table

    @property
    def weight(self) -> Tensor:
        """The stored table (for identity checks of a tied output), not a float matrix."""
        return self.table.weight

    def forward(self, ids: Tensor) -> Tensor:
        """ids (B, S) -> (B, S, dim) in the model dtype."""
        t, rows = self.table, ids.reshape(-1)
        mins = t.mins[rows] if t.mins is not None else None
        out = _dequantize(t.fmt, t.groupsize, t.weight[rows], t.scales[rows], mins, t.dtype)
        return out.view(*ids.shape, t.in_features)

    def extra_repr(self) -> str:
        t = self.table
        return f"{t.out_features}, {t.in_features}, fmt={t.fmt}, groupsize={t.groupsize}"


class FusedRMSNorm(RMSNorm):
    """RMSNorm whose decode cases (one row, or a decode batch) run as one Triton kernel instead of half
    a dozen small ones."""

    def forward(self, x: Tensor) -> Tensor:
        if _is_one_row(x) or _decode_rows(x):
            return rmsnorm(x, self.weight, self.eps)
        return super().forward(x)


class FusedAttention(nn.Module):
    """wq|wk|wv stacked in `wqkv`, and `wo`; `kv_cache` is set by Transformer.setup_caches."""

    def __init__(self, cfg: ModelConfig, wqkv: FusedLinear, wo: FusedLinear):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        self.wqkv, self.wo = wqkv, wo
        self.kv_cache: KVCache | None = None

    def decode(self, qkv: Tensor, rope: Tensor, input_pos: Tensor, row: int = 0) -> Tensor:
        """qkv: ((H + 2 H_kv) D,) for one token -> attention output (H D,), or (B, (H + 2 H_kv) D) for
        one token of each of B sequences at positions input_pos (B positions) -> (B, H D); cache rows
        [row, row + B) written."""
        cache = self.kv_cache
        return attention_decode(qkv, rope, input_pos, cache.k_cache, cache.v_cache,
                                self.n_heads, self.n_kv_heads, self.scale, row=row)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor, row: int = 0) -> Tensor:
        """The Attention module's math for any (B, S) in cache rows [row, row + B); x is already normed."""
        bsz, seqlen, _ = x.shape
        nq, nkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        short = _short_prefill_rows(x, self.wqkv)
        if short:  # a short prompt: one multi-row product for q|k|v (SHORT_PREFILL_ROWS)
            q, k, v = self.wqkv.gemv(x.reshape(short, -1)).view(bsz, seqlen, -1).split([nq, nkv, nkv], dim=-1)
        else:
            q = self.wqkv.linear(x, slice(0, nq))
            k = self.wqkv.linear(x, slice(nq, nq + nkv))
            v = self.wqkv.linear(x, slice(nq + nkv, nq + 2 * nkv))
        q = q.reshape(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.reshape(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.reshape(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v, row)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, nq)
        short = _short_prefill_rows(out, self.wo)
        if short:
            return self.wo.gemv(out.view(short, nq)).view(bsz, seqlen, -1)
        return self.wo.linear(out)


class FusedFeedForward(nn.Module):
    """w1|w3 stacked in `w13`, and `w2`."""

    def __init__(self, w13: FusedLinear, w2: FusedLinear):
        super().__init__()
        self.hidden_dim = w13.out_features // 2
        self.w13, self.w2 = w13, w2

    def forward(self, x: Tensor) -> Tensor:
        """The FeedForward module's math for any (B, S); x is already normed."""
        short = _short_prefill_rows(x, self.w13)
        if short and _short_prefill_rows(x, self.w2):  # a short prompt: SwiGLU in the w1|w3 product's epilogue
            f = self.w13.gemv(x.reshape(short, -1), swiglu=True)
            return self.w2.gemv(f).view(*x.shape[:-1], -1)
        gate = self.w13.linear(x, slice(0, self.hidden_dim))
        up = self.w13.linear(x, slice(self.hidden_dim, 2 * self.hidden_dim))
        return self.w2.linear(F.silu(gate) * up)


class FusedBlock(nn.Module):
    """Drop-in replacement for torchchat.model.transformer.Block (same forward signature)."""

    def __init__(self, cfg: ModelConfig, attention: FusedAttention, feed_forward: FusedFeedForward,
                 attention_norm: RMSNorm, ffn_norm: RMSNorm):
        super().__init__()
        self.attention, self.feed_forward = attention, feed_forward
        self.attention_norm, self.ffn_norm = attention_norm, ffn_norm
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor, row: int = 0) -> Tensor:
        """x: (B, S, dim) in cache rows [row, row + B); rope: (S, D/2, 2); mask: (1, 1, S, S_max);
        input_pos: (S,); or, each row at its own positions, rope (B, S, D/2, 2), mask (B, 1, S, S_max)
        and input_pos (B, S). A decode batch (S = 1) runs the kernels; a negative position marks an
        idle row there (nothing written to its cache row; its output is junk, never NaN)."""
        rows = 1 if _is_one_row(x) else _decode_rows(x)
        if not rows:
            h = x + self.residual_multiplier * self.attention(self.attention_norm(x), rope, mask, input_pos, row)
            return h + self.residual_multiplier * self.feed_forward(self.ffn_norm(h))
        attn, ffn, mult = self.attention, self.feed_forward, self.residual_multiplier
        if rows > 1 and input_pos.numel() == 1:  # one position shared by every row: a (1,) input_pos
            input_pos = input_pos.reshape(1).expand(rows).contiguous()
            rope = rope.reshape(1, -1).expand(rows, -1).contiguous()
        # One row keeps the one-row kernels (gemv.py); B rows are (B, dim) for the multi-row ones.
        xv = x.view(-1) if rows == 1 else x.view(rows, -1)
        qkv = attn.wqkv.gemv(xv, norm=self.attention_norm)
        a = attn.decode(qkv, rope, input_pos, row)
        h = attn.wo.gemv(a, residual=xv, res_scale=mult)
        f = ffn.w13.gemv(h, norm=self.ffn_norm, swiglu=True)
        out = ffn.w2.gemv(f, residual=h, res_scale=mult)
        return out.view(x.shape)
