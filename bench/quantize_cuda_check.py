"""Every --quantize scheme on a CUDA GPU (not a test; CI has no GPU): the weight types it produces, the
relative logit error against the unquantized model, weight bytes, eager and compiled (CUDA graphs)
decode rates, compiled == eager on one step, and whether torch.export takes the model.

Random weights of a params table's shapes. Needs torchao 0.18 beside a CUDA build of torch:

    python3 bench/quantize_cuda_check.py --shape stories110M
    python3 bench/quantize_cuda_check.py --only int4-g128-bf16 cuda.json --no-compile
"""
from __future__ import annotations

import argparse
import time

# name -> (recipe, dtype name, compile it too)
CASES = {
    "none-bf16": (None, "bf16", True),
    "none-fp32": (None, "fp32", False),
    "int8-bf16": ('{"linear:int8": {}}', "bf16", True),
    "int8-g64-bf16": ('{"linear:int8": {"groupsize": 64}}', "bf16", False),
    "int8-fp32": ('{"linear:int8": {}}', "fp32", False),
    "int8-4bit-bf16": ('{"linear:int8": {"bitwidth": 4, "groupsize": 32}}', "bf16", False),
    "int4-g128-bf16": ('{"linear:int4": {"groupsize": 128}}', "bf16", True),
    "cuda.json": ("cuda.json", "bf16", False),
    "cuda-32.json": ("cuda-32.json", "bf16", False),
    "a8w4dq-bf16": ('{"linear:a8w4dq": {"groupsize": 256}}', "bf16", True),
    "a8w4dq-fp32": ('{"linear:a8w4dq": {"groupsize": 32}}', "fp32", False),
    "emb8-bf16": ('{"embedding": {"bitwidth": 8}}', "bf16", True),
    "emb4-fp32": ('{"embedding": {"bitwidth": 4, "groupsize": 32}}', "fp32", False),
    "desktop.json": ("desktop.json", "bf16", False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps")
    a = p.parse_args()

    import torch

    from torchchat.model.registry import params_table
    from torchchat.model.size import weight_nbytes
    from torchchat.model.transformer import Transformer
    from torchchat.quantize import apply_quantization, parse_quantize

    dev = "cuda"
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {a.shape}", flush=True)
    cfg = params_table(a.shape).with_max_seq_len(256)
    torch.manual_seed(0)
    base = Transformer(cfg)
    with torch.no_grad():
        for n, w in base.named_parameters():
            w.copy_(torch.ones_like(w) if n.endswith("norm.weight") else torch.randn_like(w) * 0.02)
    state = base.state_dict()
    tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    pos = torch.arange(16, device=dev)

    def decode_rate(fn) -> float:
        tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
        for i in range(3):
            fn(tok, torch.tensor([16 + i], device=dev))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(a.steps):
            fn(tok, torch.tensor([20 + i], device=dev))
        torch.cuda.synchronize()
        return a.steps / (time.perf_counter() - t0)

    for name in a.only:
        recipe, dtype_name, compile_it = CASES[name]
        dtype = dtypes[dtype_name]
        with torch.device("meta"):
            model = Transformer(cfg)
        model.load_state_dict(state, assign=True)
        model = model.to(dev, dtype).eval()
        model.setup_caches(1, 256)
        plan = parse_quantize(recipe)
        notes = plan.validate(cfg, dev, dtype)
        with torch.no_grad():
            ref = model(tokens, pos)
            apply_quantization(model, plan, dev)
            out = model(tokens, pos)
            error = ((out - ref).norm() / ref.norm()).item()
            kinds = f"{type(model.layers[0].attention.wq.weight).__name__}/{type(model.tok_embeddings.weight).__name__}"
            line = (f"{name:<15} err {error:.4f}  {weight_nbytes(model) / 1e6:7.1f} MB  {kinds:<45} "
                    f"eager {decode_rate(model):7.1f} tok/s")
            try:
                torch.export.export(model, (tokens, pos), strict=False)
                line += "  export ok"
            except Exception as e:  # report and go on to the next scheme
                line += f"  export FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
            if compile_it and not a.no_compile:
                step = torch.compile(model, fullgraph=True, mode="reduce-overhead")
                rate = decode_rate(step)
                one, at = torch.tensor([[5]], device=dev), torch.tensor([100], device=dev)
                same = torch.equal(model(one, at).argmax(-1), step(one, at).argmax(-1))
                line += f"  compiled {rate:7.1f} tok/s, same argmax as eager: {same}"
        print(line, *notes, flush=True)


if __name__ == "__main__":
    main()
