"""GGUF Q4_0 weights kept 4-bit (torchao int4 kernels) against the dequantized dense weight, per decode
matmul (one token: x is (1, K)), and torchao's group-32 int8 tensor for Q8_0 for comparison.

    python3 bench/gguf_int4.py --device cpu      # median ms per F.linear, and ratios to dense bf16
    python3 bench/gguf_int4.py --device cuda     # (torchchat installed, or PYTHONPATH=.)

Shapes are Llama 3 8B's: q/o (4096x4096), gate/up (14336x4096), down (4096x14336)."""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from common import median_seconds


def _median_ms(fn, x, device: str, repeats: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else None
    return median_seconds(lambda: fn(x), repeats, warmup=3, sync=sync) * 1e3


def main() -> None:
    from gguf import GGMLQuantizationType, quants
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    from torchchat.checkpoint.gguf_int4 import int4_weight

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    dev = args.device
    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else torch.get_num_threads()} "
          f"{'' if dev == 'cuda' else 'threads'}), torch {torch.__version__}, median of {args.repeats}")
    print(f"{'N x K':>13} {'dense bf16':>11} {'int4 (Q4_0)':>12} {'ratio':>6} {'int8 g32 (Q8_0)':>16} {'ratio':>6}"
          f" {'dense fp32':>11} {'int4 fp32':>10} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        w = (0.02 * rng.standard_normal((n, k))).astype(np.float32)
        q4 = quants.quantize(w, GGMLQuantizationType.Q4_0).reshape(n, k // 32, 18)
        scales = np.ascontiguousarray(q4[..., :2]).view(np.float16)[..., 0].astype(np.float32)
        codes = np.concatenate([q4[..., 2:] & 0xF, q4[..., 2:] >> 4], axis=-1).reshape(n, k)
        dense = torch.from_numpy(quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_0),
                                                   GGMLQuantizationType.Q4_0)).to(dev, torch.bfloat16)
        kept = int4_weight(codes, scales, dev, torch.bfloat16)
        q8 = quants.quantize(w, GGMLQuantizationType.Q8_0).reshape(n, k // 32, 34)
        q8_scale = torch.from_numpy(np.ascontiguousarray(q8[..., :2]).view(np.float16)[..., 0].astype(np.float32))
        q8_codes = torch.from_numpy(np.ascontiguousarray(q8[..., 2:]).view(np.int8).reshape(n, k))
        int8 = Int8Tensor(q8_codes.to(dev), q8_scale.to(dev), [1, 32], torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        t_dense = _median_ms(lambda a: F.linear(a, dense), x, dev, args.repeats)
        t_int4 = _median_ms(lambda a: F.linear(a, kept), x, dev, args.repeats)
        t_int8 = _median_ms(lambda a: F.linear(a, int8), x, dev, max(5, args.repeats // 5))
        # float32: the same weights, dense and kept 4-bit with float32 scales (the CPU kernel accepts both)
        dense32 = dense.float()
        kept32 = int4_weight(codes, scales, dev, torch.float32) if dev == "cpu" else None
        x32 = x.float()
        t_dense32 = _median_ms(lambda a: F.linear(a, dense32), x32, dev, args.repeats)
        t_int4_32 = _median_ms(lambda a: F.linear(a, kept32), x32, dev, args.repeats) if kept32 is not None else float("nan")
        print(f"{n:>6}x{k:<6} {t_dense:>9.3f}ms {t_int4:>10.3f}ms {t_dense / t_int4:>5.2f}x "
              f"{t_int8:>14.3f}ms {t_dense / t_int8:>5.2f}x {t_dense32:>9.3f}ms {t_int4_32:>8.3f}ms "
              f"{t_dense32 / t_int4_32:>5.2f}x")


if __name__ == "__main__":
    with torch.no_grad():
        main()
