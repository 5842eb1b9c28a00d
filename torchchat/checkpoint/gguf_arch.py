"""GGUF architectures besides llama: qwen2, qwen3, gemma2, gemma3, phi3, smollm3 (llama.cpp's names).

One table per architecture says what llama.cpp's converter (convert_hf_to_gguf.py) wrote and how it maps
onto the one Transformer's switches:
- metadata keys are `{arch}.*` like llama's, plus the family's own (soft-caps, sliding window and its
  pattern, the sliding layers' RoPE base, Phi-3's LongRoPE attention factor);
- tensor names add `attn_q_norm`/`attn_k_norm` (Qwen3, Gemma 3), `post_attention_norm`/`post_ffw_norm`
  (Gemma), Phi-3's fused `attn_qkv` and gate|up `ffn_up`, and `rope_factors_long`/`_short` (LongRoPE);
- these families rotate half-split pairs (llama.cpp's NEOX RoPE), so q/k (and their norms) are stored as
  in the HF checkpoint and are permuted to adjacent pairs here, as torchchat.checkpoint.hf does; SmolLM3
  uses llama's RoPE, so its converter already permuted them;
- Gemma's norms are stored as 1 + w already (the converter adds the 1), so nothing is added here.

Where GGUF stores no value, llama.cpp's own choice is taken, so a file runs here as it runs there: Gemma's
attention scale is 1/sqrt(head_dim) (1/sqrt(dim/heads) for the 27B models) rather than the HF config's
query_pre_attn_scalar, Gemma 3's sliding layers use base 10000 and a 6-layer pattern, Gemma 2 a 2-layer
pattern, SmolLM3 leaves RoPE out of every 4th layer.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from torch import Tensor

from torchchat.errors import CheckpointError
from torchchat.model.config import ModelConfig, RopeScaling

ARCHITECTURES = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3", "smollm3")
_NEOX = ("qwen2", "qwen3", "gemma2", "gemma3", "phi3")  # half-split RoPE pairs: q/k are unpermuted at load
_GEMMA = ("gemma2", "gemma3")

_LAYER = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "attn_qkv": "attention.wqkv",  # Phi-3: q|k|v rows, split at load
    "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "post_attention_norm": "attention_post_norm", "post_ffw_norm": "ffn_post_norm",
}
_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def map_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    """llama.cpp tensor name -> our parameter name, with `layer_names` mapping the per-block part
    (`blk.N.<part>.weight`); None for a name the table does not know."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    return None


def our_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> our parameter name (before the fused ones are split), or None."""
    return map_name(gguf_name, _LAYER)


def needs_relayout(name: str, arch: str) -> bool:
    """Whether the tensor under our name `name` is permuted or split at load. GGML blocks move with their
    rows (runtime_packed); torchao's int4 tensors do not, so for that path such tensors load dense."""
    if arch == "phi3" and name.endswith(("wqkv.weight", "w3.weight")):
        return True
    return arch in _NEOX and name.endswith(
        ("wq.weight", "wq.bias", "wk.weight", "wk.bias", "q_norm.weight", "k_norm.weight"))


def _pattern(meta, arch: str, n_layers: int, default: int) -> list[int]:
    """Indices of the sliding-window layers: `{arch}.attention.sliding_window_pattern` is a period n (the
    last layer of every n is global, llama.cpp's set_swa_pattern) or one bool per layer."""
    value = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(value, list):
        if len(value) != n_layers:
            raise CheckpointError(f"{meta.source}: sliding_window_pattern has {len(value)} entries for {n_layers} layers")
        return [i for i, swa in enumerate(value) if swa]
    period = int(value) if value is not None else default
    return [i for i in range(n_layers) if i % period < period - 1]


def config_from_gguf_arch(meta, tensors: dict[str, Any], arch: str,
                          dense: Callable[[str], Tensor]) -> ModelConfig:
    """ModelConfig of a GGUF file of `arch` (one of ARCHITECTURES) from its metadata and tensor shapes.
    `meta` is checkpoint.gguf's typed metadata reader; `dense(name)` reads a small tensor as float32."""
    source = meta.source
    if meta.get(f"{arch}.expert_count"):
        raise CheckpointError(f"{source}: mixture-of-experts GGUF models are not supported")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{source}: GGUF file has no token_embd.weight")

    def num(key: str, default=None, integer: bool = True):
        return meta.number(f"{arch}.{key}", default, integer=integer)

    dim = num("embedding_length")
    n_heads = num("attention.head_count")
    n_layers = num("block_count")
    head_dim = num("attention.key_length", dim // n_heads)
    if num("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{source}: key and value head sizes differ; asymmetric heads are not supported")
    rope_dim = num("rope.dimension_count", head_dim)
    base = float(num("rope.freq_base", 10000.0, integer=False))
    context = num("context_length", 2048)
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF dims are innermost first: rows come last
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    scaling = None
    if arch == "phi3" and ROPE_FACTORS[0] in tensors:
        original = num("rope.scaling.original_context_length")
        attn_factor = float(num("rope.scaling.attn_factor", 1.0, integer=False))
        scaling = RopeScaling(rope_type="longrope", factor=context / original, original_max_position_embeddings=original,
                              long_factor=dense(ROPE_FACTORS[0]).tolist(), short_factor=dense(ROPE_FACTORS[1]).tolist(),
                              attention_factor=attn_factor)
    elif scaling_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(num("rope.scaling.factor", integer=False)))
    elif scaling_type not in (None, "none"):
        raise CheckpointError(f"{source}: rope scaling '{scaling_type}' of a {arch} GGUF is not supported")

    switches: dict[str, Any] = {}
    has = lambda part: f"blk.0.{part}" in tensors  # noqa: E731
    if arch == "qwen2":
        switches["qkv_bias"] = has("attn_q.bias")
    switches["attention_bias"] = has("attn_output.bias")
    switches["qk_norm"] = has("attn_q_norm.weight")
    window = num("attention.sliding_window", 0)
    if arch in _GEMMA:
        big = n_layers in (46, 62)  # Gemma 2 27B / Gemma 3 27B: llama.cpp scales by dim / heads there
        switches.update(
            embedding_multiplier=math.sqrt(dim), activation="gelu_tanh", sandwich_norms=True,
            attention_multiplier=1.0 / math.sqrt(dim // n_heads if big else head_dim),
            attn_softcap=meta.get(f"{arch}.attn_logit_softcapping") or None,
            final_softcap=meta.get(f"{arch}.final_logit_softcapping") or None,
        )
        if arch == "gemma2" and window == 0:
            window = 4096  # llama.cpp's default for Gemma 2
        if window:
            sliding = _pattern(meta, arch, n_layers, 2 if arch == "gemma2" else 6)
            switches.update(sliding_window=window, sliding_layers=tuple(sliding))
            local = meta.get(f"{arch}.rope.freq_base_swa")
            if arch == "gemma3":
                switches["rope_local_base"] = float(local) if local is not None else 10000.0
            elif local is not None and float(local) != base:
                switches["rope_local_base"] = float(local)
    elif arch == "phi3" and 0 < window < context:
        switches.update(sliding_window=window, sliding_layers=tuple(range(n_layers)))
    if arch == "smollm3":
        switches["nope_layers"] = tuple(i for i in range(n_layers) if (i + 1) % 4 == 0)
    ffn = num("feed_forward_length")
    return ModelConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=num("attention.head_count_kv", n_heads),
        head_dim=head_dim, vocab_size=vocab, hidden_dim=ffn,
        norm_eps=float(num("attention.layer_norm_rms_epsilon", 1e-6, integer=False)), rope_base=base,
        rope_scaling=scaling, max_seq_len=context, tie_embeddings="output.weight" not in tensors,
        rope_dim=rope_dim if rope_dim != head_dim else None, **switches,
    )


def runtime_packed(packed: dict[str, int], arch: str) -> dict[str, int]:
    """The packed plan (our name -> GGML type) under the names to_runtime_layout gives: each part of
    Phi-3's fused qkv and gate|up keeps the fused tensor's type."""
    out: dict[str, int] = {}
    for name, qtype in packed.items():
        base = name.rsplit(".", 2)[0]
        if name.endswith("attention.wqkv.weight"):
            out.update({f"{base}.{part}.weight": qtype for part in ("wq", "wk", "wv")})
        elif arch == "phi3" and name.endswith("feed_forward.w3.weight") and f"{base}.w1.weight" not in packed:
            out.update({f"{base}.w1.weight": qtype, name: qtype})
        else:
            out[name] = qtype
    return out


def _unpermute(w: Tensor, n_heads: int, rope_dim: int) -> Tensor:
    from torchchat.checkpoint.hf import unpermute

    return unpermute(w, n_heads, rope_dim)


def to_runtime_layout(state: dict[str, Tensor], config: ModelConfig, arch: str) -> dict[str, Tensor]:
    """Split Phi-3's fused tensors and permute half-split q/k rows (and q/k norms) to adjacent pairs."""
    out: dict[str, Tensor] = {}
    kv = config.n_kv_heads * config.head_dim
    for name, value in state.items():
        base = name.rsplit(".", 2)[0]
        if name.endswith("attention.wqkv.weight"):
            q, k, v = value.split([config.n_heads * config.head_dim, kv, kv], dim=0)
            out.update({f"{base}.wq.weight": q, f"{base}.wk.weight": k, f"{base}.wv.weight": v})
        elif arch == "phi3" and name.endswith("feed_forward.w3.weight") and value.shape[0] == 2 * config.hidden_dim:
            gate, up = value.chunk(2, dim=0)  # llama.cpp keeps Phi-3's gate|up as one ffn_up
            out.update({f"{base}.w1.weight": gate, f"{base}.w3.weight": up})
        else:
            out[name] = value
    if arch in _NEOX:
        for name in list(out):
            if name.endswith(("attention.wq.weight", "attention.wq.bias")):
                out[name] = _unpermute(out[name], config.n_heads, config.rotary_dim)
            elif name.endswith(("attention.wk.weight", "attention.wk.bias")):
                out[name] = _unpermute(out[name], config.n_kv_heads, config.rotary_dim)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                out[name] = _unpermute(out[name], 1, config.rotary_dim)
    return out
