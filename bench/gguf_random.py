"""Random-weight GGUF files of a params table's shape in one block type, for speed and memory
measurements on real shapes where no real file can be brought (the GPU machine reaches no hub).

The blocks are random bytes with each block's fp16 scale (and minimum) set to a small fixed value, so
a 7B file is written in seconds (quantizing random floats with the numpy reference would take many
minutes); the K-quants' 6- and 8-bit sub-block multipliers stay random. The weights mean nothing,
but every value is finite and small, so decoding runs as it would on a real file. No tokenizer is
stored: pass `--tokenizer-path`.

    PYTHONPATH=. python3 bench/gguf_random.py 7B Q4_K /tmp/7B-Q4_K.gguf
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# type -> (values per block, bytes per block, byte offsets of its fp16 scale fields, their values).
# Offsets follow llama.cpp's ggml-common.h: d first (Q6_K: last), then the minimum where there is one.
D = 2e-4
BLOCKS = {
    "Q4_0": (32, 18, {0: D}),
    "Q4_1": (32, 20, {0: D, 2: -8 * D}),
    "Q5_0": (32, 22, {0: D}),
    "Q5_1": (32, 24, {0: D, 2: -16 * D}),
    "Q8_0": (32, 34, {0: D}),
    "Q4_K": (256, 144, {0: D / 8, 2: D / 8}),
    "Q5_K": (256, 176, {0: D / 8, 2: D / 8}),
    "Q6_K": (256, 210, {208: D / 32}),
}


def random_blocks(rows: int, k: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(rows, k / values * bytes) uint8: random codes, the fixed scales of BLOCKS."""
    values, nbytes, scales = BLOCKS[kind]
    raw = rng.integers(0, 256, size=(rows, k // values, nbytes), dtype=np.uint8)
    for offset, value in scales.items():
        raw[:, :, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def write_random_gguf(path: Path, table: str, kind: str, seed: int = 0) -> Path:
    """A llama GGUF of params table `table`'s shape: every matrix in `kind`, the norms F32 ones."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from torchchat.model.registry import params_table

    cfg = params_table(table)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    for key, value in {
        "llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.dim,
        "llama.block_count": cfg.n_layers, "llama.feed_forward_length": cfg.hidden_dim,
        "llama.attention.head_count": cfg.n_heads, "llama.attention.head_count_kv": cfg.n_kv_heads,
        "llama.rope.dimension_count": cfg.head_dim,
    }.items():
        writer.add_uint32(key, int(value))
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", float(cfg.norm_eps))
    writer.add_float32("llama.rope.freq_base", float(cfg.rope_base))
    nq, nkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    matrices = {"token_embd.weight": (cfg.vocab_size, cfg.dim)}
    if not cfg.tie_embeddings:
        matrices["output.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        matrices.update({p + "attn_q.weight": (nq, cfg.dim), p + "attn_k.weight": (nkv, cfg.dim),
                         p + "attn_v.weight": (nkv, cfg.dim), p + "attn_output.weight": (cfg.dim, nq),
                         p + "ffn_gate.weight": (cfg.hidden_dim, cfg.dim), p + "ffn_up.weight": (cfg.hidden_dim, cfg.dim),
                         p + "ffn_down.weight": (cfg.dim, cfg.hidden_dim)})
    ones = np.ones(cfg.dim, dtype=np.float32)
    writer.add_tensor("output_norm.weight", ones)
    for i in range(cfg.n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    for name, (rows, k) in matrices.items():
        writer.add_tensor(name, random_blocks(rows, k, kind, rng), raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="params table, e.g. 7B, Meta-Llama-3-8B, stories15M")
    p.add_argument("kind", choices=list(BLOCKS))
    p.add_argument("out", type=Path)
    a = p.parse_args()
    print(write_random_gguf(a.out, a.table, a.kind))


if __name__ == "__main__":
    main()
