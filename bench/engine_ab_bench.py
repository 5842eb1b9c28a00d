"""Single-sequence decode speed through the Engine of two checkouts, interleaved (not a test).

For comparing a change to the engine with the code before it: one long-lived worker process per
checkout (PYTHONPATH picks it) builds random weights of a params table's shapes (default stories15M,
fp32, `generate --dummy-weights`'s path), makes an Engine per mode (eager, --compile), warms and
compiles it once, then answers requests. The driver asks the workers in turn, mode by mode, round by
round, so that both checkouts see the same machine load, and prints the median next-token rate of
each (checkout, mode, sampling) with the after/before ratio.

    git archive <base> | tar -x -C /tmp/before
    python3 bench/engine_ab_bench.py --before /tmp/before --after . --rounds 5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import SHARED

MODES = ("eager", "compile")
SAMPLING = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_k=200)}


def worker(a: argparse.Namespace) -> None:
    """Read a "mode sampling" line per request from stdin, answer one JSON line."""
    import torch

    import torchchat
    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    built = build_model(BuildSpec(source=ModelSource(params_table=a.shape, dummy_weights=True,
                                                     tokenizer_path=a.tokenizer), dtype=torch.float32))
    prompt = built.tokenizer.encode("Once upon a time", bos=True)
    engines = {m: make_engine(built, CompileOptions(decode=m == "compile"), max_seq_len=len(prompt) + a.tokens + 1)
               for m in a.modes}
    cfgs = {s: GenerationConfig(max_new_tokens=a.tokens, sampling=SamplingParams(**kw), stop_ids=frozenset())
            for s, kw in SAMPLING.items()}
    for engine in engines.values():  # compile (a recompile per sampling setting) and warm up
        for cfg in cfgs.values():
            list(engine.tokens(prompt, GenerationConfig(max_new_tokens=8, sampling=cfg.sampling, stop_ids=frozenset())))
    print(json.dumps({"ready": str(Path(torchchat.__file__).parent)}), flush=True)
    for line in sys.stdin:
        mode, sampling = line.split()
        engine, n, first, last = engines[mode], 0, 0.0, 0.0
        for _ in engine.tokens(prompt, cfgs[sampling]):
            last = time.perf_counter()
            n += 1
            if n == 1:
                first = last
        print(json.dumps({"tok_s": (n - 1) / (last - first)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    p.add_argument("--after", type=Path, default=Path(__file__).resolve().parent.parent)
    p.add_argument("--shape", default="stories15M", help="params table for the random weights")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=200, help="new tokens per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    args = ["--shape", a.shape, "--tokens", str(a.tokens), "--threads", str(a.threads),
            "--tokenizer", str(a.tokenizer), "--before", str(a.before), "--modes", *a.modes, "--worker"]
    workers = {}
    for name, root in (("before", a.before), ("after", a.after)):
        env = dict(os.environ, PYTHONPATH=str(root.resolve()))
        proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env, cwd=root)
        ready = json.loads(proc.stdout.readline())
        print(f"{name}: torchchat from {ready['ready']}", flush=True)
        workers[name] = proc
    rates: dict[tuple[str, str, str], list[float]] = {}
    for r in range(a.rounds):
        for mode in a.modes:
            for sampling in SAMPLING:
                # Alternate which checkout goes first, so neither always follows the other.
                order = list(workers) if r % 2 == 0 else list(reversed(workers))
                for name in order:
                    proc = workers[name]
                    proc.stdin.write(f"{mode} {sampling}\n")
                    proc.stdin.flush()
                    rate = json.loads(proc.stdout.readline())["tok_s"]
                    rates.setdefault((name, mode, sampling), []).append(rate)
                    print(f"round {r + 1}/{a.rounds} {mode:<8} {sampling:<8} {name:<7} {rate:7.1f} tok/s", flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()

    print(f"\n{a.shape} fp32, random weights, {a.threads} thread(s), {a.tokens} new tokens per run, "
          f"{a.rounds} interleaved rounds, median (min-max) next-token rate")
    # The per-round ratio pairs runs made one right after the other, under the same machine load; on a
    # shared machine it is steadier than the ratio of the medians.
    print(f"{'mode':<8} {'sampling':<8} {'before tok/s':>20} {'after tok/s':>20} {'ratio of medians':>16} "
          f"{'median paired ratio':>19}")
    for mode in a.modes:
        for sampling in SAMPLING:
            cells = []
            for name in workers:
                v = rates[name, mode, sampling]
                cells.append((statistics.median(v), min(v), max(v)))
            (b, bmin, bmax), (f, fmin, fmax) = cells
            paired = statistics.median(x / y for x, y in zip(rates["after", mode, sampling],
                                                                rates["before", mode, sampling]))
            print(f"{mode:<8} {sampling:<8} {f'{b:.1f} ({bmin:.0f}-{bmax:.0f})':>20} "
                  f"{f'{f:.1f} ({fmin:.0f}-{fmax:.0f})':>20} {f / b:>15.3f}x {paired:>18.3f}x")


if __name__ == "__main__":
    main()
