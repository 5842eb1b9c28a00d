"""Speculative decoding: greedy tokens/s with and without a draft model, and the acceptance rate, side
by side in one run (medians of several runs). Greedy outputs are checked to be identical.

By default the target and the draft are both stories260K (the only trained pair on these machines):
acceptance is then ~100% and the figure is the cost of the speculation loop itself, since the draft
is as expensive as the target. Pass a larger --target and a small --draft of the same tokenizer for a
real speed-up.

    python3 bench/speculative_bench.py [--target CKPT] [--draft CKPT] [--tokenizer TOK] [--k 2 4 8]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import SHARED
from torchchat.build import BuildSpec, ModelSource, build_model
from torchchat.generation.engine import GenerationConfig, make_engine
from torchchat.generation.sampling import SamplingParams

STORIES = SHARED / "models" / "stories260K"


def timed(engine, prompt, cfg):
    start = time.perf_counter()
    out = list(engine.tokens(prompt, cfg))
    return out, len(out) / (time.perf_counter() - start), engine.last_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=STORIES / "stories260K.bin")
    parser.add_argument("--draft", type=Path, default=STORIES / "stories260K.bin")
    parser.add_argument("--tokenizer", type=Path, default=STORIES / "tok512.model")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    def spec(path):
        return BuildSpec(ModelSource(checkpoint_path=path, tokenizer_path=args.tokenizer), device="cpu",
                         dtype=torch.float32, max_seq_len=args.tokens + 16)

    target = build_model(spec(args.target))
    engine = make_engine(target, max_seq_len=args.tokens + 16)
    draft = build_model(spec(args.draft)).runtime
    prompt = target.tokenizer.encode("Once upon a time", bos=True)
    cfg = GenerationConfig(max_new_tokens=args.tokens, sampling=SamplingParams(temperature=0.0), stop_ids=frozenset())
    print(f"target {args.target.name}, draft {args.draft.name}, fp32 cpu, {torch.get_num_threads()} threads, "
          f"{args.tokens} greedy tokens, median of {args.repeat}")
    print(f"{'k':>4} {'tok/s':>8} {'vs alone':>9} {'acceptance':>11}")
    reference, rates = None, []
    for _ in range(args.repeat):
        reference, rate, _ = timed(engine, prompt, cfg)
        rates.append(rate)
    alone = statistics.median(rates)
    print(f"{'-':>4} {alone:>8.1f} {1.0:>9.2f} {'-':>11}")
    for k in args.k:
        engine.attach_draft(draft, k)
        rates, stats = [], None
        for _ in range(args.repeat):
            out, rate, stats = timed(engine, prompt, cfg)
            assert out == reference, "greedy speculative output differs from the target alone"
            rates.append(rate)
        engine.draft = None
        median = statistics.median(rates)
        print(f"{k:>4} {median:>8.1f} {median / alone:>9.2f} {stats.acceptance_rate:>11.1%}")


if __name__ == "__main__":
    main()
