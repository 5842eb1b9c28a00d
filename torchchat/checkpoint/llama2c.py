"""llama2.c `.bin` exports: legacy (v0: 7-int header, classifier shared when vocab_size > 0) and
version 1 ("ak42" magic, 256-byte header, float32 weights in a different order).

Weights are viewed straight from a memory map: no copy is made until dtype conversion."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchchat.errors import CheckpointError
from torchchat.model.config import ModelConfig

V1_MAGIC = 0x616B3432  # "ak42"


def is_llama2c(head: bytes, size: int) -> bool:
    """True for a v1 export, or a legacy one whose header is plausible and whose size matches."""
    if len(head) >= 8 and struct.unpack("<I", head[:4])[0] == V1_MAGIC:
        return True
    if len(head) < 28:
        return False
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", head[:28])
    plausible = all(0 < v < 1 << 20 for v in (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq))
    return plausible and dim % n_heads == 0


def _legacy_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq, shared):
    hd = dim // n_heads
    kv = n_kv * hd
    layout = [
        ("tok_embeddings.weight", None, (vocab, dim)),
        ("attention_norm", n_layers, (dim,)),
        ("attention.wq", n_layers, (n_heads * hd, dim)),
        ("attention.wk", n_layers, (kv, dim)),
        ("attention.wv", n_layers, (kv, dim)),
        ("attention.wo", n_layers, (dim, n_heads * hd)),
        ("ffn_norm", n_layers, (dim,)),
        ("feed_forward.w1", n_layers, (hidden, dim)),
        ("feed_forward.w2", n_layers, (dim, hidden)),
        ("feed_forward.w3", n_layers, (hidden, dim)),
        ("norm.weight", None, (dim,)),
        (None, None, (seq, hd // 2)),  # freq_cis_real: derived, skipped
        (None, None, (seq, hd // 2)),  # freq_cis_imag
    ]
    if not shared:
        layout.append(("output.weight", None, (vocab, dim)))
    return layout


def _v1_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq, shared):
    hd = dim // n_heads
    kv = n_kv * hd
    layout = [
        ("attention_norm", n_layers, (dim,)),
        ("ffn_norm", n_layers, (dim,)),
        ("norm.weight", None, (dim,)),
        ("tok_embeddings.weight", None, (vocab, dim)),
        ("attention.wq", n_layers, (n_heads * hd, dim)),
        ("attention.wk", n_layers, (kv, dim)),
        ("attention.wv", n_layers, (kv, dim)),
        ("attention.wo", n_layers, (dim, n_heads * hd)),
        ("feed_forward.w1", n_layers, (hidden, dim)),
        ("feed_forward.w2", n_layers, (dim, hidden)),
        ("feed_forward.w3", n_layers, (hidden, dim)),
    ]
    if not shared:
        layout.append(("output.weight", None, (vocab, dim)))
    return layout


def _check_header(path: Path, dim, hidden, n_layers, n_heads, n_kv, vocab, seq) -> None:
    """Header fields in range before any size is computed from them (the values are int32 and untrusted)."""
    fields = {"dim": dim, "hidden_dim": hidden, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
              "vocab_size": vocab, "seq_len": seq}
    bad = [f"{k} {v}" for k, v in fields.items() if not 0 < v < 1 << 20]
    if not bad and dim % n_heads:
        bad.append(f"dim {dim} not a multiple of n_heads {n_heads}")
    if not bad and (n_heads % n_kv or (dim // n_heads) % 2):
        bad.append(f"n_heads {n_heads} / n_kv_heads {n_kv} / head size {dim // n_heads} do not fit together")
    if bad:
        raise CheckpointError(f"{path}: damaged llama2.c header ({', '.join(bad)}); download the checkpoint again")


def load_llama2c(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file untouched
    head = bytes(data[:256])
    if struct.unpack("<I", head[:4])[0] == V1_MAGIC:
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            raise CheckpointError(f"{path}: llama2.c export version {version} is not supported (only 0 and 1)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        offset, layout = 256, _v1_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq, shared)
    else:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", head[:28])
        shared = vocab > 0
        vocab = abs(vocab)
        offset, layout = 28, _legacy_layout(dim, hidden, n_layers, n_heads, n_kv, vocab, seq, shared)
    _check_header(path, dim, hidden, n_layers, n_heads, n_kv, vocab, seq)
    config = ModelConfig(
        dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=vocab, max_seq_len=seq, tie_embeddings=shared,
    )
    need = offset + 4 * sum(int(np.prod(shape)) * (count or 1) for _, count, shape in layout)
    # Exactly, not at least: a header edited to fewer layers or heads still "fits" a larger file and
    # would decode into garbage; the file has no other checksum.
    if data.size < need:
        raise CheckpointError(
            f"{path}: truncated llama2.c checkpoint: {data.size} bytes, the header promises {need}; download it again"
        )
    if data.size > need:
        raise CheckpointError(
            f"{path}: llama2.c checkpoint of {data.size} bytes, but its header describes {need}: the header or the "
            "file is damaged; download it again"
        )
    floats = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=(need - offset) // 4, offset=offset))
    state: dict[str, Tensor] = {}
    pos = 0
    for name, count, shape in layout:
        numel = int(np.prod(shape))
        for i in range(count or 1):
            if name is not None:
                key = name if count is None else f"layers.{i}.{name}.weight"
                state[key] = floats[pos : pos + numel].view(shape)
            pos += numel
    return config, state
