"""Decode speed of the C++ runners (aoti_run on a .pt2, et_run on a .pte) against Python's engine (eager,
and with the decode step compiled), on the stories15M shape with random weights.

    ./install/build_runner.sh all
    python3 bench/runner_bench.py [--runs 5] [--threads 1] [--tokens 200]

Exports once with `torchchat.py export --dummy-weights --params-table stories15M` into
bench/out/stories15M/ (reused on later runs); Python builds the same weights (the same seed). Each round
runs every contender once, so they share the machine's state; the figure is the median over rounds of
decode tok/s (tokens after the first / time after the first), greedy from "Once upon a time".
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import CLI, ROOT, SHARED

OUT = ROOT / "bench" / "out" / "stories15M"
TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
PROMPT = "Once upon a time"
DECODE = re.compile(r"generated tokens: (\d+), prefill: [\d.]+ ms, decode: ([\d.]+) tok/s")


def source_args() -> list[str]:
    return ["--params-table", "stories15M", "--dummy-weights", "--tokenizer-path", str(TOKENIZER), "--dtype", "fp32"]


def export_if_missing(threads: int) -> None:
    outputs = {"pt2": "--output-aoti-package-path", "pte": "--output-pte-path"}
    missing = [k for k in outputs if not (OUT / f"model.{k}").exists()]
    if missing:
        print(f"exporting stories15M as {', '.join(missing)} into {OUT} (minutes) ...", file=sys.stderr)
        OUT.mkdir(parents=True, exist_ok=True)
        targets = [arg for k in missing for arg in (outputs[k], str(OUT / f"model.{k}"))]
        subprocess.run([*CLI, "export", *source_args(), *targets], check=True,
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def run_native(binary: str, model: Path, tokens: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([str(ROOT / "cmake-out" / binary), str(model), "-z", str(TOKENIZER), "-i", PROMPT,
                           "-n", str(tokens), "-t", "0"], capture_output=True, text=True, env=env, check=True)
    m = DECODE.search(proc.stderr)
    if int(m.group(1)) != tokens:
        print(f"note: {binary} stopped after {m.group(1)} tokens", file=sys.stderr)
    return float(m.group(2))


def python_contenders(tokens: int):
    """name -> callable giving decode tok/s of one greedy generation in this process."""
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions

    source = ModelSource(params_table="stories15M", dummy_weights=True, tokenizer_path=TOKENIZER)
    built = build_model(BuildSpec(source=source, dtype=torch.float32))  # the weights the exports hold
    ids = built.tokenizer.encode(PROMPT, bos=True)
    cfg = GenerationConfig(max_new_tokens=tokens, sampling=SamplingParams(temperature=0.0), stop_ids=frozenset())

    def make(options):
        engine = make_engine(built, options)

        def once() -> float:
            with torch.no_grad():
                for _ in engine.tokens(ids, cfg):
                    pass
            return engine.last_stats.next_tokens_per_s

        return once

    return {"python eager": make(CompileOptions()), "python --compile": make(CompileOptions(decode=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    export_if_missing(args.threads)
    contenders = {
        "aoti_run .pt2": lambda: run_native("aoti_run", OUT / "model.pt2", args.tokens, args.threads),
        "et_run .pte": lambda: run_native("et_run", OUT / "model.pte", args.tokens, args.threads),
        **python_contenders(args.tokens),
    }
    for fn in contenders.values():  # warm-up: compile, page in the libraries and weights
        fn()
    results = {name: [] for name in contenders}
    for _ in range(args.runs):
        for name, fn in contenders.items():
            results[name].append(fn())
    base = statistics.median(results["python eager"])
    print(f"stories15M shape, fp32, {args.tokens} tokens greedy, {args.threads} thread(s), median of {args.runs}")
    print(f"{'contender':<18} {'decode tok/s':>12} {'vs python eager':>16}   all runs")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:<18} {med:>12.1f} {med / base:>15.2f}x   {' '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
