"""Decode-step cost of the model by batch size, and batch-1 decode speed, in this process.

Random weights of a params table (default stories15M, fp32, eager). For each batch size B, every row
decodes at its own position ((B, 1) input_pos, as the server's batched engine does; B = 1 uses the
shared (1,) position of the batch-1 path) and the step's median time over `--steps` is printed with
tokens/s = B / step time. Run it from two checkouts in turn to compare batch-1 speed before/after a
change (PYTHONPATH picks the checkout):

    python3 bench/batch_decode_bench.py --batches 1 2 4 8 16
    PYTHONPATH=../main python3 bench/batch_decode_bench.py --batches 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="stories15M")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--context", type=int, default=256)
    a = p.parse_args()
    import torchchat
    from torchchat.model.config import ModelConfig
    from torchchat.model.transformer import Transformer

    params = json.loads((Path(torchchat.__file__).parent / "model_params" / f"{a.shape}.json").read_text())
    params.setdefault("vocab_size", 32000)
    cfg = ModelConfig.from_params(params)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    print(f"{a.shape} fp32 eager, {torch.get_num_threads()} threads, torchchat from {Path(torchchat.__file__).parent}")
    print(f"{'batch':>5} {'step ms':>8} {'tok/s':>8} {'x batch 1':>9}")
    base = None
    with torch.no_grad():
        for b in a.batches:
            model.setup_caches(max(b, 1), a.context)
            times = []
            for i in range(a.steps + 5):
                tokens = torch.randint(0, cfg.vocab_size, (b, 1))
                if b == 1:
                    pos = torch.tensor([10 + i])
                else:
                    pos = (torch.arange(b).view(b, 1) * 7 + 10 + i) % (a.context - 1)
                t0 = time.perf_counter()
                model(tokens, pos)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
            step = statistics.median(times)
            rate = b / step
            base = base or rate
            print(f"{b:>5} {step * 1e3:>8.2f} {rate:>8.1f} {rate / base:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
