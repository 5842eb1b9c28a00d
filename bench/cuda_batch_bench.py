"""Decode-step time of the fused CUDA model by batch size: what the server's batched engine pays per
step for B sequences (issues 17, 18).

Random weights of a params table (default the Llama-2-7B shape), built straight on the GPU by the
fused builder that `--device cuda` uses (torchchat.kernels.transform.fuse_model, with torchchat's own
int8 / int4 recipes: no torchao), in bf16, int8 (per channel) and int4 (groupsize 128). For each batch
size B the engine's decode forward is timed as the engine runs it under --compile: one CUDA graph per
batch bucket (torchchat.generation.steps.CudaGraphStep), B = 1 on the one-row kernels with a shared
(1,) position, B > 1 on the multi-row kernels with a (B, 1) position per row (rows at positions
`--position` + 16 i). Printed per B: the step's median time, aggregate tok/s (B / step), per-sequence
tok/s (1 / step), the aggregate's ratio to batch 1, the weight bytes read per second, and how long
the bucket's first call took (compiling its kernels and capturing its graph).

    PYTHONPATH=. python3 bench/cuda_batch_bench.py                       # 7B: bf16, int8, int4 at 1..16
    PYTHONPATH=. python3 bench/cuda_batch_bench.py --quant int4 --batches 1 4
    PYTHONPATH=. python3 bench/cuda_batch_bench.py --shape stories260K --device cpu --steps 1 --batches 1 2 4 --position 16

On a CPU (`--device cpu`) the kernels run in Triton's interpreter, in fp32: a smoke test of the script
and the kernels, not a timing. (stories15M's head_dim 48 is not a power of two, which the fused
attention kernel needs; stories260K's rows are too short for the int8/int4 packing blocks, so its
layers stay float, as the printed note says.)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

from common import ROOT, median_seconds

QUANT = {
    "bf16": None,
    "int8": '{"linear:int8": {"bitwidth": 8, "groupsize": 0}}',
    "int4": '{"linear:int4": {"groupsize": 128}}',
}


def _build(shape: str, quant: str | None, device: str, dtype):
    """The fused model of a params table's shape with --dummy-weights' random values, as
    torchchat.build._materialize_fused makes it (no checkpoint, no tokenizer)."""
    import torch

    from torchchat.kernels import linear_quant, unsupported_reason
    from torchchat.kernels.transform import fuse_model
    from torchchat.model.config import ModelConfig
    from torchchat.model.dummy_weights import dummy_tensor
    from torchchat.model.transformer import Transformer
    from torchchat.quantize import parse_quantize

    params = json.loads((ROOT / "torchchat" / "model_params" / f"{shape}.json").read_text())
    params.setdefault("vocab_size", 32000)
    cfg = ModelConfig.from_params(params)
    plan = parse_quantize(quant) if quant is not None else None
    reason = unsupported_reason(cfg, dtype, plan)
    if reason is not None:
        raise SystemExit(f"{shape}: the fused path cannot run it: {reason}")
    fused_quant, rest = linear_quant(plan)
    if rest is not None:
        raise SystemExit(f"{quant}: only linear recipes are fused (the rest would need torchao)")
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with torch.no_grad():
        notes = fuse_model(model, lambda n: dummy_tensor(n, shapes[n], device, dtype, 1234), fused_quant, device, dtype)
    for note in notes:
        print(f"  note: {note}")
    return model.eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7B", help="a params table in torchchat/model_params (default 7B)")
    p.add_argument("--quant", nargs="+", default=list(QUANT), choices=list(QUANT))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=50, help="timed steps per batch size (median)")
    p.add_argument("--context", type=int, default=1024, help="KV-cache positions per row")
    p.add_argument("--position", type=int, default=256, help="position of row 0 (row i: + 16 i)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    if a.device == "cpu":
        # Before triton is imported (torchchat.kernels' submodules); wide one-row tiles keep the
        # interpreter's program count down.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        tiles = {f"{f}{s}": [32, 128, 4] for f in ("float", "int8", "int4") for s in ("", ":small", ":large")}
        os.environ.setdefault("TORCHCHAT_GEMV_TILES", json.dumps(tiles))
    import torch

    from torchchat.generation.steps import CompileOptions, CudaGraphStep, Steps
    from torchchat.runtime.base import EagerRuntime

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the interpreter smoke test")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else None
    if cuda:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = []
    for q in a.quant:
        t0 = time.perf_counter()
        model = _build(a.shape, QUANT[q], a.device, dtype)
        runtime = EagerRuntime(model)
        context = min(a.context, model.config.max_seq_len)
        if a.position + 16 * (max(a.batches) - 1) >= context - 1:
            raise SystemExit(f"--position + 16 * (batch - 1) must stay below the context ({context}) - 1")
        runtime.setup(max(a.batches), context)
        weight_bytes = sum(t.numel() * t.element_size() for name, t in model.named_parameters()
                           if not name.startswith("tok_embeddings"))  # an embedding row per sequence only
        # --compile's decode: CUDA graphs on the GPU; the interpreter runs the kernels as they are.
        steps = Steps(runtime.forward, runtime.device, CompileOptions(decode=cuda), runtime.graph_key)
        forward = steps.decode_forward()
        assert isinstance(forward, CudaGraphStep) == cuda
        label = q if cuda else q.replace("bf16", "fp32")  # the interpreter runs the float format in fp32
        print(f"\n{a.shape} {label}: built in {time.perf_counter() - t0:.1f} s, {weight_bytes / 1e9:.2f} GB of weights, "
              f"context {context}", flush=True)
        print(f"{'batch':>5} {'step ms':>8} {'agg tok/s':>10} {'seq tok/s':>10} {'x batch 1':>9} {'weights GB/s':>12} "
              f"{'1st call s':>10}")
        base = None
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in a.batches:
                tokens = torch.randint(0, model.config.vocab_size, (b, 1), generator=gen).to(a.device)
                pos = (a.position + 16 * torch.arange(b)).to(a.device)
                pos = pos if b == 1 else pos.view(b, 1)  # as BatchEngine._decode feeds them
                t1 = time.perf_counter()
                forward(tokens, pos)  # compile the kernels, capture this bucket's graph
                if sync:
                    sync()
                first = time.perf_counter() - t1
                step = median_seconds(lambda: forward(tokens, pos), a.steps, warmup=3 if cuda else 0, sync=sync)
                agg = b / step
                base = base or agg
                row = {"shape": a.shape, "quant": label, "batch": b, "step_ms": step * 1e3, "agg_tok_s": agg,
                       "seq_tok_s": 1 / step, "x_batch1": agg / base, "weights_gb_s": weight_bytes / step / 1e9,
                       "first_call_s": first, "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)"}
                rows.append(row)
                print(f"{b:>5} {step * 1e3:>8.3f} {agg:>10.1f} {1 / step:>10.1f} {agg / base:>9.2f} "
                      f"{row['weights_gb_s']:>12.0f} {first:>10.1f}", flush=True)
        if cuda:
            print(f"  graphs held: {forward.graphs} (one per batch size)")
        del model, runtime, steps, forward
        gc.collect()  # the graphs' memory pools go with the last references to them
        if cuda:
            torch.cuda.empty_cache()
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
