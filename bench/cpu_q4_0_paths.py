"""GGUF Q4_0 on the CPU: torchao's int4 kernel (the path torchchat used to keep Q4_0 4-bit, bf16 only)
against torchchat's native kernel on the file's own blocks (torchchat.kernels.cpu), per F.linear, for
one token (decode) and 128 (prefill), at the given thread counts. Decides which path the CPU takes.

    python3 bench/cpu_q4_0_paths.py --threads 1 2 --repeats 20
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    from gguf import GGMLQuantizationType, quants

    from torchchat.checkpoint.gguf_int4 import int4_weight
    from torchchat.checkpoint.gguf_tensors import unpack_q4_0
    from torchchat.kernels import cpu

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    cpu.ensure_loaded()
    print(f"torch {torch.__version__}, kernels isa {cpu.isa()}, median ms of {a.repeats}")
    print(f"{'N x K':>13} {'thr':>3} {'rows':>4} {'torchao int4 bf16':>18} {'native Q4_0 bf16':>17} {'native Q4_0 fp32':>17}")
    rng = np.random.default_rng(0)

    class _T:
        def __init__(self, data, shape):
            self.data, self.shape = data, np.array(list(reversed(shape)))

    for n, k in ((2048, 2048), (8192, 2048), (2048, 8192), (768, 768)):
        w = (0.02 * rng.standard_normal((n, k))).astype(np.float32)
        blocks = quants.quantize(w, GGMLQuantizationType.Q4_0)
        packed = torch.from_numpy(np.ascontiguousarray(blocks)).reshape(n, -1)
        kept = int4_weight(*unpack_q4_0(_T(blocks, (n, k))), "cpu", torch.bfloat16)
        for threads in a.threads:
            torch.set_num_threads(threads)
            for rows in (1, 128):
                x = torch.randn(rows, k, dtype=torch.bfloat16)
                t_ao = _median_ms(lambda: F.linear(x, kept), a.repeats)
                t_nb = _median_ms(lambda: cpu.linear(x, packed, cpu.Q4_0, n, k), a.repeats)
                x32 = x.float()
                t_nf = _median_ms(lambda: cpu.linear(x32, packed, cpu.Q4_0, n, k), a.repeats)
                print(f"{n:>6}x{k:<6} {threads:>3} {rows:>4} {t_ao:>16.3f}ms {t_nb:>15.3f}ms {t_nf:>15.3f}ms", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
