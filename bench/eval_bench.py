"""Log-likelihood scoring speed of the eval adapter by batch size (rows per forward).

Scores the shipped storybook requests (36 stories as perplexity windows + 32 cloze items x 3 choices)
through `TorchchatLM` with each batch size in turn, round after round, and prints the median wall time
of each and its speed-up over batch 1. Shapes other than stories260K use random weights (speed does not
depend on the values).

    python3 -m bench.eval_bench                                   # stories260K and stories15M, fp32
    python3 -m bench.eval_bench --shapes stories15M --batches 1 8 --dtype bf16 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TORCHCHAT_SHARED", ROOT.parent / "shared"))
DATA = ROOT / "torchchat" / "evaluation" / "tasks" / "storybook"


def build(shape: str, dtype):
    from torchchat.build import BuildSpec, ModelSource, build_model

    if shape == "stories260K":
        d = SHARED / "models" / "stories260K"
        source = ModelSource(checkpoint_path=d / "stories260K.bin", tokenizer_path=d / "tok512.model")
    else:
        source = ModelSource(params_table=shape, dummy_weights=True,
                             tokenizer_path=SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    return build_model(BuildSpec(source=source, dtype=dtype))


def requests():
    from lm_eval.api.instance import Instance

    rows = lambda name: [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]  # noqa: E731
    rolling = [Instance("loglikelihood_rolling", {}, (r["text"],), 0) for r in rows("stories.jsonl")]
    pairs = [Instance("loglikelihood", {}, (r["context"], " " + c), 0)
             for r in rows("cloze.jsonl") for c in r["choices"]]
    return rolling, pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["stories260K", "stories15M"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    import torch

    from torchchat.build import resolve_dtype
    from torchchat.evaluation.adapter import TorchchatLM

    dtype = resolve_dtype(a.dtype, "cpu")
    rolling, pairs = requests()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, max length {a.max_length}, "
          f"{len(rolling)} texts + {len(pairs)} pairs, median of {a.rounds} rounds")
    print(f"{'shape':<12} {'batch':>5} {'median s':>9} {'min s':>7} {'forwards':>8} {'speed-up':>8}")
    for shape in a.shapes:
        built = build(shape, dtype)
        times: dict[int, list[float]] = {b: [] for b in a.batches}
        calls: dict[int, int] = {}
        for _ in range(a.rounds + 1):  # the first round warms up and is dropped
            for b in a.batches:
                lm = TorchchatLM(built.runtime, built.tokenizer, max_length=a.max_length, batch_size=b)
                start = time.perf_counter()
                lm.loglikelihood_rolling(rolling, disable_tqdm=True)
                lm.loglikelihood(pairs, disable_tqdm=True)
                times[b].append(time.perf_counter() - start)
                calls[b] = len(lm.timer.seconds)
        base = statistics.median(times[a.batches[0]][1:])
        for b in a.batches:
            kept = times[b][1:]
            med = statistics.median(kept)
            print(f"{shape:<12} {b:>5} {med:>9.3f} {min(kept):>7.3f} {calls[b]:>8} {base / med:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
