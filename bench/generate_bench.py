"""Batch-1 decode speed of `generate` at real shapes with random weights (issue: the spine's benchmark).

Runs the real CLI (`torchchat.py generate --dummy-weights ... --metrics-json`) for each configuration in
turn, side by side in one run, and prints the median next-token throughput over the samples (the compile
sample excluded). Random weights give the same speed as real ones; greedy decoding of random weights
never stops early at EOS (we pass --max-new-tokens and check the count).

    python3 bench/generate_bench.py                       # stories15M and stories110M, fp32/bf16, eager/compile
    python3 bench/generate_bench.py --shapes stories15M --samples 5 --modes compile --dtypes bf16
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import CLI, SHARED, run


def run_one(shape: str, dtype: str, mode: str, samples: int, tokens: int, tokenizer: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        compiled = mode != "eager"
        cmd = [*CLI, "generate", "--params-table", shape, "--dummy-weights",
               "--tokenizer-path", str(tokenizer), "--dtype", dtype, "--device", "cpu", "--temperature", "0",
               "--prompt", "Once upon a time", "--max-new-tokens", str(tokens),
               "--num-samples", str(samples + (1 if compiled else 0)), "--metrics-json", str(out), *extra]
        if compiled:
            cmd.append("--compile")
        run(cmd)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["stories15M", "stories110M"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more generate flags, e.g. --quantize ...")
    a = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.samples} samples x {a.tokens} tokens")
    print(f"{'shape':<12} {'dtype':<5} {'mode':<8} {'median tok/s':>12} {'min':>8} {'max':>8} {'MB/token':>9} {'GB/s':>6}")
    for shape in a.shapes:
        for dtype in a.dtypes:
            for mode in a.modes:
                m = run_one(shape, dtype, mode, a.samples, a.tokens, a.tokenizer, a.extra)
                kept = [s for s in m["samples"] if not s["compile_sample"]]
                rates = [s["next_tokens_per_s"] for s in kept]
                assert all(s["generated_tokens"] == a.tokens for s in kept)
                print(f"{shape:<12} {dtype:<5} {mode:<8} {m['median']['next_tokens_per_s']:>12.1f} {min(rates):>8.1f} "
                      f"{max(rates):>8.1f} {m['model_bytes_per_token'] / 1e6:>9.1f} {m['median']['bandwidth_gb_s']:>6.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
