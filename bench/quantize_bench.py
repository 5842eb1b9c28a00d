"""Decode speed and model size of each --quantize scheme, eager and compiled (not a test).

Builds every configuration first (random weights of a params table's shapes, through the same
build_model / make_engine path as `generate --dummy-weights`), compiles what is to be compiled, then
runs the samples round-robin so that all configurations see the same machine load: a busy shared
machine slows each of them alike, and the ratios stay comparable. Prints, per configuration: weight
bytes (quantized tensors at what they really store), bytes read per decoded token, and the median
next-token rate with its ratio to the unquantized fp32 model in the same mode.

    python3 bench/quantize_bench.py                                  # stories110M, the default table
    python3 bench/quantize_bench.py --shape stories15M --tokens 50 --samples 3 --modes compile
    python3 bench/quantize_bench.py --only none-fp32 int4-bf16
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import SHARED

# name -> (dtype, recipe)
CONFIGS = {
    "none-fp32": ("fp32", None),
    "none-bf16": ("bf16", None),
    "int8-fp32": ("fp32", '{"linear:int8": {"bitwidth": 8, "groupsize": 0}}'),
    "int8-bf16": ("bf16", '{"linear:int8": {"bitwidth": 8, "groupsize": 0}}'),
    "int4-bf16": ("bf16", '{"linear:int4": {"groupsize": 128}}'),
    "a8w4dq-fp32": ("fp32", '{"linear:a8w4dq": {"groupsize": 256}}'),
    "emb8-fp32": ("fp32", '{"embedding": {"bitwidth": 8, "groupsize": 0}}'),
    "emb4-fp32": ("fp32", '{"embedding": {"bitwidth": 4, "groupsize": 32}}'),
    "emb8+int4-bf16": ("bf16", '{"embedding": {"bitwidth": 8, "groupsize": 0}, "linear:int4": {"groupsize": 128}}'),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="stories110M", help="params table for the random weights")
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    p.add_argument("--samples", type=int, default=5, help="timed samples per configuration (after one warm-up)")
    p.add_argument("--tokens", type=int, default=200, help="new tokens per sample, compiled")
    p.add_argument("--eager-tokens", type=int, default=50,
                   help="new tokens per sample, eager (the eager reference paths run at a few tok/s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    a = p.parse_args()

    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model, resolve_dtype
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions
    from torchchat.model.size import bytes_read_per_token, weight_nbytes
    from torchchat.quantize import parse_quantize

    if a.threads:
        torch.set_num_threads(a.threads)
    # Every configuration compiles the same step function (one code object), each with its own model:
    # more than dynamo's default 8 cache entries in this one process.
    torch._dynamo.config.recompile_limit = 64
    source = ModelSource(params_table=a.shape, dummy_weights=True, tokenizer_path=a.tokenizer)
    greedy = SamplingParams(temperature=0)
    cfgs = {mode: GenerationConfig(max_new_tokens=n, sampling=greedy, stop_ids=frozenset())
            for mode, n in (("eager", a.eager_tokens), ("compile", a.tokens))}
    runs = {}  # (config, mode) -> (engine, prompt)
    sizes = {}
    for name in a.only:
        dtype, recipe = CONFIGS[name]
        t0 = time.perf_counter()
        built = build_model(BuildSpec(source=source, dtype=resolve_dtype(dtype, "cpu"), quant=parse_quantize(recipe)))
        sizes[name] = (weight_nbytes(built.model), bytes_read_per_token(built.model))
        prompt = built.tokenizer.encode("Once upon a time", bos=True)
        for mode in a.modes:
            options = CompileOptions(decode=mode == "compile")
            engine = make_engine(built, options, max_seq_len=len(prompt) + max(a.tokens, a.eager_tokens) + 1)
            list(engine.tokens(prompt, GenerationConfig(max_new_tokens=4, sampling=greedy)))  # warm-up / compile
            runs[name, mode] = (engine, prompt)
        print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)

    rates: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for i in range(a.samples):
        for key, (engine, prompt) in runs.items():
            cfg = cfgs[key[1]]
            n = sum(1 for _ in engine.tokens(prompt, cfg))
            assert n == cfg.max_new_tokens
            rates[key].append(engine.last_stats.next_tokens_per_s)
            print(f"round {i + 1}/{a.samples}: {key[0]} {key[1]} {rates[key][-1]:.1f} tok/s", flush=True)

    print(f"\n{a.shape}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.samples} samples x {a.eager_tokens} (eager) / {a.tokens} (compiled) tokens, greedy, "
          "median next-token rate")
    print(f"{'config':<16} {'mode':<8} {'weights MB':>10} {'MB/token':>9} {'tok/s':>7} {'min':>7} {'max':>7} "
          f"{'vs fp32':>8}")
    for (name, mode), values in rates.items():
        median = statistics.median(values)
        base = rates.get(("none-fp32", mode))
        ratio = f"{median / statistics.median(base):.2f}x" if base else "-"
        total, per_token = sizes[name]
        print(f"{name:<16} {mode:<8} {total / 1e6:>10.1f} {per_token / 1e6:>9.1f} {median:>7.1f} {min(values):>7.1f} "
              f"{max(values):>7.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
