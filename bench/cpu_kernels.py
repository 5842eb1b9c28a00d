"""Microbenchmark of torchchat's CPU kernels (torchchat/kernels/cpu) against a dense F.linear.

Per GGUF type and weight shape: GEMV (M=1, decode) and prefill (M=128), at 1 and 2 threads; median
milliseconds over several runs and the effective bandwidth of the packed weight bytes (GB/s), beside
a dense bf16 and fp32 F.linear of the same shape in the same run. Weights are random codes (speed does
not depend on the values).

    python3 -m bench.cpu_kernels                          # every type, both model shapes
    python3 -m bench.cpu_kernels --types Q4_0 Q8_0 --shapes 110m --threads 2 --m 1
    python3 -m bench.cpu_kernels --model 110m --m 1 128   # every linear of one forward, distinct weights

--model runs all the linear layers of one forward of a stories110M / Llama-3.2-1B-shaped model with
distinct weights per layer (so the weights stream from memory as in a real decode step) and prints the
time per forward: the kernels' share of a token, to set beside llama-bench's whole-token time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from torchchat.kernels import cpu

SHAPES = {  # (name, n, k): n output rows, k inputs
    "110m": [("attn 768x768", 768, 768), ("w1/w3 2048x768", 2048, 768), ("w2 768x2048", 768, 2048)],
    "1b": [("attn 2048x2048", 2048, 2048), ("w1/w3 8192x2048", 8192, 2048), ("w2 2048x8192", 2048, 8192),
           ("output 128256x2048", 128256, 2048)],
}
TYPES = {"Q4_0": cpu.Q4_0, "Q4_1": cpu.Q4_1, "Q8_0": cpu.Q8_0, "Q4_K": cpu.Q4_K, "Q5_K": cpu.Q5_K, "Q6_K": cpu.Q6_K}


def random_packed(qtype: int, n: int, k: int) -> torch.Tensor:
    """Random bytes with every fp16 scale field set to a small finite value (random bytes could be NaN)."""
    w = torch.randint(0, 256, (n, cpu.row_bytes(qtype, k)), dtype=torch.uint8)
    elems, nbytes = cpu.formats.BLOCKS[qtype]
    blocks = w.view(n, k // elems, nbytes)
    half = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    offsets = {cpu.Q6_K: [208]}.get(qtype, [0, 2] if qtype in (cpu.Q4_1, cpu.Q4_K, cpu.Q5_K) else [0])
    for o in offsets:
        blocks[:, :, o : o + 2] = half
    return w


def laid_out(w: torch.Tensor, qtype: int, n: int, k: int, layout: str) -> tuple[torch.Tensor, int]:
    """The weight and type id the kernels get: the file's layout, or ("x16") the row-interleaved one
    torchchat runs (torchchat.model.layout) where the type has it and n is a multiple of 16."""
    if layout == "x16" and qtype in cpu.X16_BLOCK_BYTES and n % 16 == 0:
        return cpu.interleave(w, qtype, k), qtype | cpu.X16
    return w, qtype


MODELS = {  # layers, dim, hidden, vocab (output layer)
    "110m": (12, 768, 2048, 32000),
    "1b": (16, 2048, 8192, 128256),
}


def model_linears(name: str) -> list[tuple[int, int]]:
    """(n, k) of every linear of one forward, in order (the 1B model's k/v are 512 wide: GQA)."""
    layers, dim, hidden, vocab = MODELS[name]
    kv = dim // 4 if name == "1b" else dim
    per_layer = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden)]
    return per_layer * layers + [(vocab, dim)]


def bench_model(args, dtype) -> None:
    # CPU time beside wall time: on a shared machine the wall time mostly measures waiting for a core.
    print("| model | type | M | threads | wall ms per forward (median) | forwards/s | CPU ms per forward, all threads (median) | weight MB |")
    print("|---|---|---|---|---|---|---|---|")
    for t in args.types:
        weights = [(*laid_out(random_packed(TYPES[t], n, k), TYPES[t], n, k, args.layout), n, k)
                   for n, k in model_linears(args.model)]
        mb = sum(w.numel() for w, _, _, _ in weights) / 1e6
        for m in args.m:
            xs = {k: torch.randn(m, k, dtype=dtype) for _, _, _, k in weights}

            def forward():
                for w, q, n, k in weights:
                    cpu.linear(xs[k], w, q, n, k)

            for th in args.threads:
                torch.set_num_threads(th)
                ms = median_ms(forward, min_time=1.0, max_runs=20)
                cpu_ms = median_ms(forward, min_time=1.0, max_runs=20, clock=time.process_time)
                print(f"| {args.model} | {t} ({args.layout}) | {m} | {th} | {ms:.2f} | {1e3 / ms:.1f} | {cpu_ms:.2f} | {mb:.0f} |", flush=True)
        del weights


def median_ms(fn, min_time: float = 0.3, max_runs: int = 50, clock=time.perf_counter) -> float:
    fn()  # warm up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t = clock()
        fn()
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--m", nargs="+", type=int, default=[1, 128], help="activation rows (1 = decode)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
    p.add_argument("--no-dense", action="store_true", help="skip the dense F.linear columns")
    p.add_argument("--model", choices=list(MODELS), help="time all linears of one forward instead")
    p.add_argument("--layout", choices=["x16", "file"], default="x16",
                   help="x16: the row-interleaved layout torchchat runs; file: the GGUF rows as stored")
    args = p.parse_args()
    cpu.ensure_loaded()
    dtype = getattr(torch, args.dtype)
    print(f"isa {cpu.isa()}, prefill {cpu.prefill_mode()}, torch {torch.__version__}, activations {args.dtype}")
    if args.model:
        bench_model(args, dtype)
        return
    print("| shape | M | threads | dense fp32 ms | dense bf16 ms | " + " | ".join(f"{t} ms (GB/s)" for t in args.types) + " |")
    print("|---" * (5 + len(args.types)) + "|")
    for shape_set in args.shapes:
        for name, n, k in SHAPES[shape_set]:
            packed = {t: laid_out(random_packed(TYPES[t], n, k), TYPES[t], n, k, args.layout) for t in args.types}
            dense32 = None if args.no_dense else torch.randn(n, k)
            dense16 = None if args.no_dense else dense32.bfloat16()
            for m in args.m:
                x = torch.randn(m, k, dtype=dtype)
                for th in args.threads:
                    torch.set_num_threads(th)
                    cells = []
                    if dense32 is not None:
                        x32, x16 = x.float(), x.bfloat16()
                        cells.append(f"{median_ms(lambda: F.linear(x32, dense32)):.3f}")
                        cells.append(f"{median_ms(lambda: F.linear(x16, dense16)):.3f}")
                    else:
                        cells += ["-", "-"]
                    for t in args.types:
                        w, q = packed[t]
                        ms = median_ms(lambda: cpu.linear(x, w, q, n, k))
                        cells.append(f"{ms:.3f} ({w.numel() / ms / 1e6:.1f})")
                    print(f"| {name} | {m} | {th} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
