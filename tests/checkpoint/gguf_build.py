"""Writing GGUF test files: a llama model in any tensor type, with gguf.GGUFWriter.

gguf-py quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0. It cannot quantize the K-quants, so
`pack_k_quant` builds Q4_K, Q5_K and Q6_K blocks from the format's definition (llama.cpp ggml-common.h:
block_q4_K {half d, dmin; u8 scales[12]; u8 qs[128]}, block_q5_K {.., u8 qh[32], ..}, block_q6_K
{u8 ql[128], qh[64]; i8 scales[16]; half d}) and also returns the values those blocks stand for, computed
from the chosen integers directly, so that a loader's unpacking can be checked exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from torchchat.model.config import ModelConfig

_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}


def gguf_name(ours: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}
    if ours in top:
        return top[ours]
    _, layer, rest = ours.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_NAMES[module]}.{kind}"


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _k_scales(needed: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-block fp16 super-scale d and per-sub-block integer multipliers sc <= top with d * sc >= needed.
    needed: (B, S) >= 0. Returns (d (B,) float16, sc (B, S) int, effective (B, S) float32 = d * sc)."""
    d = _f16(needed.max(axis=1) / (top - 1))  # one level of headroom for the fp16 rounding of d
    d32 = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.ceil(needed / d32), 0).astype(np.int64)
    assert sc.max() <= top
    return d, sc, (d32 * sc.astype(np.float32)).astype(np.float32)


def _round_div(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(step > 0, np.round(x / step), 0)


def _pack_scales_12(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins in 12 bytes. Bytes 0-3 hold scales 0-3 (low 6
    bits) and bits 4-5 of scales 4-7 (top 2 bits); bytes 4-7 the same for the mins; bytes 8-11 the low
    4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    for j in range(4):
        out[:, j] = sc[:, j] | ((sc[:, j + 4] >> 4) << 6)
        out[:, j + 4] = m[:, j] | ((m[:, j + 4] >> 4) << 6)
        out[:, j + 8] = (sc[:, j + 4] & 0xF) | ((m[:, j + 4] & 0xF) << 4)
    return out


def _q4k_q5k(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: (B, 256) -> (block bytes, intended values (B, 256), step (B, 256): each value's quantization step)."""
    levels = (1 << bits) - 1
    sub = x.reshape(-1, 8, 32)
    neg_min = np.maximum(-sub.min(axis=2), 0)  # the offset each sub-block needs
    dmin, m, offset = _k_scales(neg_min, 63)
    d, sc, step = _k_scales((sub.max(axis=2) + offset) / levels, 63)
    q = np.clip(_round_div(sub + offset[..., None], step[..., None]), 0, levels).astype(np.uint8)
    intended = step[..., None] * q.astype(np.float32) - offset[..., None]
    low = q & 0xF
    qs = np.concatenate([low[:, 2 * i] | (low[:, 2 * i + 1] << 4) for i in range(4)], axis=1)  # (B, 128)
    parts = [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), _pack_scales_12(sc, m)]
    if bits == 5:
        high = (q >> 4) & 1  # (B, 8, 32): bit j of qh[l] is the high bit of element l of sub-block j
        qh = np.zeros((x.shape[0], 32), dtype=np.uint8)
        for j in range(8):
            qh |= high[:, j] << j
        parts.append(qh)
    parts.append(qs)
    steps = np.repeat(step, 32, axis=1)
    return np.concatenate(parts, axis=1), intended.reshape(-1, 256), steps


def _q6k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sub = x.reshape(-1, 16, 16)
    d, sc, step = _k_scales(np.abs(sub).max(axis=2) / 31, 127)
    q = (np.clip(_round_div(sub, step[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)  # 6-bit codes
    intended = (step[..., None] * (q.reshape(-1, 16, 16).astype(np.float32) - 32)).reshape(-1, 256)
    low, high = q & 0xF, q >> 4
    ql = np.zeros((x.shape[0], 128), dtype=np.uint8)
    qh = np.zeros((x.shape[0], 64), dtype=np.uint8)
    for half in range(2):
        base = 128 * half
        # ql: low nibbles of elements base+0..63, high nibbles of elements base+64..127
        ql[:, 64 * half : 64 * half + 64] = low[:, base : base + 64] | (low[:, base + 64 : base + 128] << 4)
        for s in range(4):  # qh: bits 2s..2s+1 of byte l hold the top 2 bits of element base + 32s + l
            qh[:, 32 * half : 32 * half + 32] |= high[:, base + 32 * s : base + 32 * s + 32] << (2 * s)
    parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d.reshape(-1, 1).view(np.uint8)]
    return np.concatenate(parts, axis=1), intended, np.repeat(step, 16, axis=1)


def pack_k_quant(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w: (N, K) float32, K a multiple of 256 -> (bytes (N, K/256 * block bytes), intended (N, K), step (N, K))."""
    n, k = w.shape
    blocks = w.reshape(-1, 256).astype(np.float32)
    packed, intended, step = {"Q4_K": lambda b: _q4k_q5k(b, 4), "Q5_K": lambda b: _q4k_q5k(b, 5), "Q6_K": _q6k}[kind](blocks)
    return packed.reshape(n, -1), intended.reshape(n, k), step.reshape(n, k)


def encode(w: np.ndarray, kind: str) -> np.ndarray:
    """A float32 tensor in GGUF type `kind`, as the array GGUFWriter.add_tensor takes."""
    from gguf import GGMLQuantizationType, quants

    if kind == "F32":
        return w.astype(np.float32)
    if kind == "F16":
        return w.astype(np.float16)
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        return pack_k_quant(w, kind)[0]
    return quants.quantize(w.astype(np.float32), GGMLQuantizationType[kind])


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Transformer state dict of `config`'s shapes: norms near 1, matrices N(0, 0.05); no output
    matrix where the config ties it to the embedding (the GGUF then has none either)."""
    from torchchat.model.transformer import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {k: (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1 else 0.05 * torch.randn(s, generator=gen)
          for k, s in shapes.items()}
    if config.tie_embeddings:
        sd.pop("output.weight")
    return sd


def write_llama_gguf(
    path: Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    kind_of=lambda name, w: "F32",
    extra_tensors: dict[str, object] | None = None,
    metadata: dict[str, object] | None = None,
    arch: str = "llama",
) -> None:
    """Write `state_dict` (our names, float32) as a llama GGUF; `kind_of(our_name, array)` picks each
    tensor's type. `extra_tensors` are written as given (an array, or (raw bytes, GGML type)) under their
    GGUF names. `metadata` adds or overrides keys (a value of None removes one)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    kv: dict[str, object] = {
        "llama.context_length": config.max_seq_len,
        "llama.embedding_length": config.dim,
        "llama.block_count": config.n_layers,
        "llama.feed_forward_length": config.hidden_dim,
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.n_kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(config.norm_eps),
        "llama.rope.freq_base": float(config.rope_base),
        "llama.rope.dimension_count": config.head_dim,
    }
    kv.update(metadata or {})
    writer = GGUFWriter(path, arch)
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    for name, tensor in state_dict.items():
        w = tensor.detach().float().numpy()
        kind = kind_of(name, w)
        data = encode(w, kind)
        raw = None if kind in ("F32", "F16") else GGMLQuantizationType[kind]
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw)
    for name, value in (extra_tensors or {}).items():
        array, raw = value if isinstance(value, tuple) else (value, None)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
