"""The Llama-family Transformer (gpt-fast style): RMSNorm -> Attention -> FeedForward -> Block ->
Transformer. Parameter names follow Meta's checkpoints (wq/wk/wv/wo, w1/w2/w3); other layouts are
mapped to these at load time (torchchat/checkpoint)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchchat.model.config import ModelConfig
from torchchat.model.kv_cache import KVCache
from torchchat.model.rope import apply_rope, rope_table


def _native_eager(x: Tensor) -> bool:
    """Whether a module whose `native_ops` is set runs torchchat_cpu's fused RMSNorm / RoPE + KV-cache
    write / SwiGLU: only eagerly on the CPU. Each replaces a chain of small aten ops (a stories15M Q4_0
    prefill of 128 tokens spent about two thirds of its time in ~3000 of them, the matrix products one
    third); traced steps keep the PyTorch code, which Inductor fuses itself."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # Set by torchchat.model.layout where torchchat's CPU kernels are loaded (see _native_eager).
        self.native_ops = False

    def forward(self, x: Tensor) -> Tensor:
        if self.native_ops and x.dtype == self.weight.dtype and _native_eager(x):
            return torch.ops.torchchat_cpu.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        bias = cfg.attention_bias
        qkv_bias = bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=bias)
        self.wqkv: nn.Linear | None = None  # wq|wk|wv stacked, set by torchchat.model.layout in their place
        self.kv_cache: KVCache | None = None
        # Per-layer switches, fixed at construction, so the traced step has no branches on data.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.use_rope = layer_id not in cfg.nope_layers
        self.rope_dim = cfg.rotary_dim
        self.softcap = cfg.attn_softcap
        self.window = cfg.sliding_window if layer_id in cfg.sliding_layers else 0
        # Set by torchchat.model.layout where torchchat's CPU kernels are loaded: decode steps then
        # read only the cache positions the mask allows (torchchat_cpu::decode_attention).
        self.native_decode = False
        # Set there too: eager CPU steps rotate q, and k while writing the cache, in native passes.
        self.native_ops = False

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor, row: int = 0) -> Tensor:
        """x: (B, S, dim); rope: (S, rope_dim/2, 2); mask: (1, 1, S, S_max) bool; input_pos: (S,); or, with
        a position per batch row, rope (B, S, rope_dim/2, 2), mask (B, 1, S, S_max), input_pos (B, S). The
        batch rows use KV-cache rows [row, row + B)."""
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None:
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.reshape(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.native_ops and _native_eager(x):
            rope_dim = self.rope_dim if self.use_rope else 0
            if rope_dim:
                q = torch.ops.torchchat_cpu.rope(q, rope, rope_dim)
            q = q.transpose(1, 2)  # (B, H, S, D)
            k, v = self.kv_cache.update_rotated(input_pos, k, v, rope, rope_dim, row)  # (B, H_kv, S_max, D)
        else:
            if self.use_rope and self.rope_dim < self.head_dim:  # partial rotary: the first rope_dim dims of a head
                q, k = (torch.cat([apply_rope(t[..., : self.rope_dim], rope), t[..., self.rope_dim :]], dim=-1)
                        for t in (q, k))
            elif self.use_rope:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
            k, v = self.kv_cache.update(input_pos, k, v, row)  # (B, H_kv, S_max, D)
        if seqlen > 1 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            # Eager prefill reads only the cache up to the last position written, not all S_max slots
            # (masked out anyway): a 128-token prompt in a 512 cache spent 4x the attention time.
            # Traced steps keep static shapes, and on CUDA reading the position would synchronize.
            end = int(input_pos.max()) + 1
            k, v, mask = k[:, :, :end], v[:, :, :end], mask[..., :end]
            if (self.native_ops and end == seqlen and input_pos.dim() == 1 and self.window == 0
                    and self.softcap is None):
                # A prompt from position 0 (its positions are 0..S-1): the mask is plain causal, which
                # SDPA's CPU flash kernel applies itself instead of converting and reading a mask
                # (stories15M's (1, 6, 128, 48): 213-218 us a call against 232-239 us, plus the mask's
                # two `where` ops a layer).
                mask = None
        if seqlen == 1 and x.device.type == "cpu" and self.native_decode:
            # Reads the cache in its own element type (float16 where layout chose it).
            out = torch.ops.torchchat_cpu.decode_attention(q, k, v, input_pos, self.scale, self.window)
            return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))
        if k.dtype != q.dtype:  # a cache kept narrower than the model (Transformer.kv_cache_dtype)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if self.softcap is not None:
            out = _softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        elif seqlen == 1 and x.device.type == "cpu":
            # CPU's scaled_dot_product_attention costs ~85 us per call for one query (stories15M), a
            # sixth of a compiled decode step; these few ops compile into much less.
            out = _decode_attention(q, k, v, mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One query per sequence: q (B, H, 1, D) against the cache k, v (B, H_kv, S_max, D); mask
    (1 or B, 1, 1, S_max)."""
    bsz, n_heads, _, head_dim = q.shape
    n_kv = k.size(1)
    qg = q.view(bsz, n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask.view(mask.size(0), 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).type_as(v)
    return torch.matmul(probs, v).view(bsz, n_heads, 1, head_dim)


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, cap: float) -> Tensor:
    """Gemma 2's attention: scores soft-capped (cap * tanh(scores / cap)) before the mask and softmax,
    which scaled_dot_product_attention cannot do. q (B, H, S, D); k, v (B, H_kv, S_max, D); mask
    (1 or B, 1, S, S_max) bool. Returns (B, H, S, D)."""
    bsz, n_heads, seqlen, head_dim = q.shape
    n_kv, s_max = k.size(1), k.size(2)
    group = n_heads // n_kv
    # Heads of a group share one K/V: q is made contiguous, so (G, S) merge by a view. Every size is
    # spelled out: a reshape of the strided tensor or a -1 left torch.export guards that fail for a dynamic S.
    qg = q.contiguous().view(bsz, n_kv, group * seqlen, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, H_kv, G*S, S_max)
    scores = torch.tanh(scores / cap) * cap
    scores = scores.view(bsz, n_kv, group, seqlen, s_max).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1).type_as(v).view(bsz, n_kv, group * seqlen, s_max)
    return torch.matmul(probs, v).unflatten(2, (group, seqlen)).flatten(1, 2)  # (B, H, S, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.w13: nn.Linear | None = None  # w1|w3 stacked, set by torchchat.model.layout in their place
        self.gelu = cfg.activation == "gelu_tanh"
        self.native_ops = False  # set by torchchat.model.layout (see _native_eager)

    def forward(self, x: Tensor) -> Tensor:
        if self.native_ops and self.w13 is not None and not self.gelu and _native_eager(x):
            return self.w2(torch.ops.torchchat_cpu.silu_mul(self.w13(x)))  # silu(gate) * up from gate|up
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        if self.gelu:
            return self.w2(F.gelu(gate, approximate="tanh") * up)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.residual_multiplier = cfg.residual_multiplier
        if cfg.sandwich_norms:
            self.attention_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.ffn_post_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.sandwich = cfg.sandwich_norms

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor, row: int = 0) -> Tensor:
        if self.sandwich:
            h = x + self.attention_post_norm(self.attention(self.attention_norm(x), rope, mask, input_pos, row))
            return h + self.ffn_post_norm(self.feed_forward(self.ffn_norm(h)))
        if self.residual_multiplier == 1.0:  # (most models: a multiply by 1 is a whole pass in eager mode)
            h = x + self.attention(self.attention_norm(x), rope, mask, input_pos, row)
            return h + self.feed_forward(self.ffn_norm(h))
        h = x + self.residual_multiplier * self.attention(self.attention_norm(x), rope, mask, input_pos, row)
        return h + self.residual_multiplier * self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = -1
        self.max_seq = -1
        # The KV caches' element type; None: the weights' dtype. torchchat.model.layout sets float16 for
        # fp32 models decoding with the native CPU attention (half the bytes each step reads, as llama.cpp).
        self.kv_cache_dtype: torch.dtype | None = None
        self._cache_dtype: torch.dtype | None = None

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate KV caches, the RoPE table and the causal mask for up to `max_seq` positions.

        Reallocates only when the size changes. New caches start zeroed; a position is always written
        before it is attended to, so old contents never need clearing."""
        max_seq = min(max_seq, self.config.max_seq_len)
        dtype = self.kv_cache_dtype or self.norm.weight.dtype
        if (max_batch, max_seq, dtype) == (self.max_batch, self.max_seq, self._cache_dtype):
            return
        cfg = self.config
        device = self.norm.weight.device
        for layer in self.layers:
            attn = layer.attention
            # The layer's own head count: under tensor parallelism it holds n_kv_heads / N of them.
            attn.kv_cache = KVCache(max_batch, max_seq, attn.n_kv_heads, cfg.head_dim, dtype).to(device)
        table = rope_table(max_seq, cfg.rotary_dim, cfg.rope_base, cfg.rope_scaling).to(device)
        self.register_buffer("rope", table, persistent=False)  # (S_max, rope_dim/2, 2)
        causal = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)  # (S_max, S_max)
        if cfg.rope_local_base is not None:
            local = rope_table(max_seq, cfg.rotary_dim, cfg.rope_local_base).to(device)
            self.register_buffer("rope_local", local, persistent=False)  # (S_max, rope_dim/2, 2)
        if cfg.sliding_layers:
            # Row i sees positions (i - sliding_window, i]: the window is a mask row, indexed by input_pos
            # like the causal one, so decoding stays free of position-dependent control flow.
            sliding = torch.triu(causal, diagonal=1 - cfg.sliding_window)
            self.register_buffer("sliding_mask", sliding, persistent=False)  # (S_max, S_max)
        self.max_batch, self.max_seq, self._cache_dtype = max_batch, max_seq, dtype

    def forward(self, tokens: Tensor, input_pos: Tensor, row: int = 0, last_only: bool = False,
                last_index: Tensor | None = None) -> Tensor:
        """tokens: (B, S) int64; input_pos: (S,) positions of those tokens, or (B, S) when the rows are
        sequences at different positions (batched serving). The rows use KV-cache rows [row, row + B).
        Returns logits (B, S, V) fp32, or (B, 1, V) for the last position alone with `last_only` (a
        prefill samples from that one: the output matrix then multiplies one row instead of S).
        `last_index` (B,) int64, with `last_only`: row b's last position is last_index[b], not S - 1
        (prompts of different lengths in one batch, each padded at its end)."""
        if self.max_seq < 0:
            raise RuntimeError("call Transformer.setup_caches(max_batch, max_seq) before forward")
        if input_pos.dim() == 1:
            mask = self.causal_mask[input_pos].view(1, 1, input_pos.size(0), self.max_seq)
        else:
            mask = self.causal_mask[input_pos].unsqueeze(1)  # (B, 1, S, S_max)
        rope = self.rope[input_pos]
        cfg = self.config
        local_rope = self.rope_local[input_pos] if cfg.rope_local_base is not None else rope
        local_mask = mask
        if cfg.sliding_layers:
            local_mask = self.sliding_mask[input_pos]
            local_mask = (local_mask.view(1, 1, input_pos.size(0), self.max_seq) if input_pos.dim() == 1
                          else local_mask.unsqueeze(1))
        x = self.tok_embeddings(tokens)
        if cfg.embedding_multiplier != 1.0:
            x = x * cfg.embedding_multiplier
        for i, layer in enumerate(self.layers):
            # Fixed per layer, so the traced step has no branch on data. Only batched serving passes a
            # row (a prefill into that sequence's cache row); a traced forward never does.
            layer_rope, layer_mask = (local_rope, local_mask) if i in cfg.sliding_layers else (rope, mask)
            x = layer(x, layer_rope, layer_mask, input_pos, row) if row else layer(x, layer_rope, layer_mask, input_pos)
        if last_only:
            x = x[:, -1:] if last_index is None else x[torch.arange(x.size(0), device=x.device), last_index].unsqueeze(1)
        logits = self.output(self.norm(x))
        if cfg.logits_scaling != 1.0:
            logits = logits / cfg.logits_scaling
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits.float()
