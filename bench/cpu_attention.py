"""torchchat_cpu::decode_attention alone: microseconds per layer at one position, stories110M's shape by
default (12 layers of 12 heads x 64, a 512-slot float16 cache, 1 thread), with the caches evicted
before each round by summing 64 MB (as a decode step's GEMVs do: "cold") and right after it ("warm").
Thread CPU time, medians of --rounds.

    python3 bench/cpu_attention.py --pos 144
    python3 bench/cpu_attention.py --pos 144 --isa avx2 --cache bf16

To compare two checkouts, run this script from each in alternation (PYTHONPATH=CHECKOUT): each builds
and loads its own kernels.
"""
from __future__ import annotations

import argparse
import statistics
import time

CACHE = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pos", type=int, default=144, help="the position decoded (positions 0..pos are read)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="cached heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--slots", type=int, default=512, help="cache positions (S_max)")
    p.add_argument("--cache", choices=sorted(CACHE), default="f16")
    p.add_argument("--isa", default=None, help="cap the instruction set (scalar, avx2, avx512, avx512vnni)")
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()

    import torch

    from torchchat.kernels import cpu

    torch.set_num_threads(1)
    cpu.ensure_loaded()
    if a.isa:
        cpu.set_isa(a.isa)
    dtype = getattr(torch, CACHE[a.cache])
    kv = a.kv_heads or a.heads
    g = torch.Generator().manual_seed(0)
    ks = [torch.randn(1, kv, a.slots, a.head_dim, generator=g).to(dtype) for _ in range(a.layers)]
    vs = [torch.randn(1, kv, a.slots, a.head_dim, generator=g).to(dtype) for _ in range(a.layers)]
    q = torch.randn(1, a.heads, 1, a.head_dim, generator=g)
    big = torch.ones(16 << 20)  # 64 MB
    pos = torch.tensor([a.pos])
    scale = a.head_dim ** -0.5

    def all_layers() -> float:
        t0 = time.thread_time_ns()
        for k, v in zip(ks, vs):
            torch.ops.torchchat_cpu.decode_attention(q, k, v, pos, scale, 0)
        return (time.thread_time_ns() - t0) / a.layers / 1000

    cold, warm = [], []
    for _ in range(a.rounds):
        big.sum()
        cold.append(all_layers())
        warm.append(all_layers())
    print(f"{cpu.isa()} {a.cache} cache, position {a.pos}: cold {statistics.median(cold):.1f} us/layer, "
          f"warm {statistics.median(warm):.1f} us/layer (medians of {a.rounds})")


if __name__ == "__main__":
    main()
