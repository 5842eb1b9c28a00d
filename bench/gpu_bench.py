"""GPU decode benchmark and checks for the fused CUDA path (torchchat/kernels), in one script so a
whole session on a lent GPU is one command. Results go to stdout (a short table last) and, with
--out DIR, to JSON files there.

    PYTHONPATH=. python3 bench/gpu_bench.py env          # versions, device-copy bandwidth, torchao import
    PYTHONPATH=. python3 bench/gpu_bench.py kernels      # GEMV tile sweep per format and layer shape (GB/s)
    PYTHONPATH=. python3 bench/gpu_bench.py profile      # engine vs graph-replay time per token; kernel table
    PYTHONPATH=. python3 bench/gpu_bench.py check        # greedy: fused + CUDA graph vs eager PyTorch modules
    PYTHONPATH=. python3 bench/gpu_bench.py memory       # peak GPU memory while building (dummy 7B/8B)
    PYTHONPATH=. python3 bench/gpu_bench.py generate     # `torchchat.py generate` tok/s, cold/warm start

`generate` runs the real CLI in subprocesses, the reference method of issue 10: random weights
(--dummy-weights), batch 1, a 6-token prompt, 200 new tokens, temperature 0.8, top-k 200, --compile,
median over 5 samples after one compile/warm-up sample. Each configuration runs twice: first with
empty Triton/Inductor caches (cold), then again with the caches it left (warm); time to first token is
measured from process start to the first generated text on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, SHARED

PROMPT = "Hello, my name is"  # BOS + 5 tokens with the Llama 2 and Llama 3 tokenizers
QUANT = {
    "bf16": None,
    "int8": '{"linear:int8": {"bitwidth": 8, "groupsize": 0}}',
    "int4": '{"linear:int4": {"groupsize": 128}}',
}
TOKENIZER = {"7B": "llama2", "Meta-Llama-3-8B": "llama3"}


def _save(out: Path | None, name: str, data) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(data, indent=1, default=str) + "\n")


def _tokenizer(tokenizers: Path, model: str) -> Path:
    return tokenizers / TOKENIZER[model] / "tokenizer.model"


# ----------------------------------------------------------------------------------------------- env
def cmd_env(a) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"missing: {e}"
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # noqa: F401

        lin = torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda")
        quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        lin(torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda"))
        info["torchao"] = f"{torchao.__version__}: imports, int4 tile_packed_to_4d runs"
    except Exception as e:  # report whatever breaks, this is a probe
        info["torchao"] = f"fails: {type(e).__name__}: {str(e)[:300]}"
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    info["copy_tb_s"] = 2 * src.numel() * 2 / statistics.median(times) / 1e12
    del src, dst
    torch.cuda.empty_cache()
    for k, v in info.items():
        print(f"{k:>10}: {v}")
    return info


# ------------------------------------------------------------------------------------------- kernels
SHAPES = {  # (N, K) of the batch-1 GEMVs: q|k|v, wo, w1|w3, w2, output
    "7B": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)],
    "8B": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
}


def _graph_time(fn, reps: int) -> float:
    """Seconds per call of `fn`, captured `reps` times back to back in one CUDA graph."""
    import torch

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def _weights(fmt: str, n: int, k: int, group: int, copies: int):
    import torch

    from torchchat.kernels.formats import empty_storage, quantize_into

    out = []
    for i in range(copies):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        st = empty_storage(fmt, n, k, group, torch.bfloat16, "cuda")
        quantize_into(st, fmt, group, 0, w)
        out.append(st)
    return out


def _nbytes(st) -> int:
    return sum(t.numel() * t.element_size() for t in st.values())


ROLES = ("qkv", "wo", "w13", "w2", "output")  # the order of SHAPES' entries


def _role_args(role: str, fmt: str, k: int, n: int):
    """The fused prologue/epilogue each layer uses in the model (torchchat/kernels/modules.py)."""
    import torch

    args = {}
    if role in ("qkv", "w13"):
        if fmt == "float":
            args["norm_weight"] = torch.rand(k, dtype=torch.bfloat16, device="cuda") + 0.5
        else:
            args["rms_only"] = True
        args["eps"] = 1e-5
    if role == "w13":
        args["swiglu"] = True
    if role in ("wo", "w2"):
        args["residual"] = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    if role == "output":
        args["out_dtype"] = torch.float32
    return args


def _tile_name(cfg) -> str:
    return f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}"


def cmd_kernels(a) -> dict:
    """Per format and layer shape, with the layer's fused prologue/epilogue: achieved GB/s for each
    tile; the best tile over all shapes (time-weighted), also for layers of <= SMALL_ROWS outputs."""
    import torch

    from torchchat.kernels.formats import dequantize, pack_block
    from torchchat.kernels.gemv import SMALL_ROWS, GemvConfig, gemv, pick_config

    grids = {
        "float": [GemvConfig(2, 2048, 8), GemvConfig(2, 2048, 4), GemvConfig(2, 1024, 4), GemvConfig(4, 1024, 8)],
        "int8": [GemvConfig(bn, bk, w) for bn, bk, w in [(8, 512, 8), (16, 512, 8), (16, 512, 4), (32, 512, 8),
                                                          (8, 1024, 8), (16, 1024, 8), (16, 1024, 4), (32, 1024, 4)]],
        "int4": [GemvConfig(bn, bk, w) for bn, bk, w in [(16, 512, 8), (16, 512, 4), (32, 512, 4), (32, 512, 8),
                                                          (16, 1024, 8), (16, 1024, 4), (32, 1024, 4), (64, 512, 4)]],
    }
    groups = {"float": 0, "int8": 0, "int4": 128}
    shapes = list(dict.fromkeys((role, n, k) for m in a.models for role, (n, k) in zip(ROLES, SHAPES[m])))
    results, tiles = {}, {}
    for fmt in a.formats:
        group = groups[fmt]
        rows = []
        for role, n_w, k in shapes:
            n = n_w // 2 if role == "w13" else n_w
            probe = _weights(fmt, n_w, k, group, 1)[0]
            copies = max(1, -(-400_000_000 // _nbytes(probe)))  # rotate through > 8x the L2
            sets = [probe] + _weights(fmt, n_w, k, group, copies - 1)
            x = torch.randn(k, dtype=torch.bfloat16, device="cuda")
            extra = _role_args(role, fmt, k, n)
            wd = dequantize(fmt, group, probe["weight"], probe.get("scales"), probe.get("mins"), torch.bfloat16)
            ref = (wd.double() @ x.double())
            got = gemv(x, fmt, group, probe["weight"], probe.get("scales"), probe.get("mins")).double()
            err = ((got - ref).norm() / ref.norm()).item()
            byt = _nbytes(probe)
            row = {"role": role, "n": n_w, "k": k, "bytes": byt, "rel_err": err, "configs": {}}
            default = pick_config(fmt, n, k, pack_block(fmt, group) if fmt != "float" else 0)
            for cfg in dict.fromkeys(grids[fmt] + [default]):
                def call(cfg=cfg, sets=sets):
                    for st in sets:
                        gemv(x, fmt, group, st["weight"], st.get("scales"), st.get("mins"), config=cfg, **extra)
                try:
                    t = _graph_time(call, 4) / len(sets)
                except Exception as e:  # a tile the compiler rejects (resources): report, go on
                    row["configs"][_tile_name(cfg)] = f"error {type(e).__name__}"
                    continue
                row["configs"][_tile_name(cfg)] = byt / t / 1e9
            best = max((v, c) for c, v in row["configs"].items() if isinstance(v, float))
            row["best"] = best
            row["default"] = row["configs"].get(_tile_name(default))
            print(f"{fmt:>5} {role:<6} {n_w:>6}x{k:<6} err {err:.1e}  default {row['default']:.0f} GB/s  "
                  f"best {best[0]:.0f} GB/s ({best[1]})", flush=True)
            rows.append(row)
            del sets, probe
            torch.cuda.empty_cache()
        results[fmt] = rows
        small = [r for r in rows if r["n"] // (2 if r["role"] == "w13" else 1) <= SMALL_ROWS]
        for label, subset in ((fmt, rows), (fmt + ":small", small)):
            # Best tile over the subset, time-weighted: total bytes / total time.
            totals = {}
            for row in subset:
                for c, v in row["configs"].items():
                    if isinstance(v, float):
                        totals.setdefault(c, []).append(row["bytes"] / v)
            whole = {c: sum(r["bytes"] for r in subset) / sum(ts) for c, ts in totals.items() if len(ts) == len(subset)}
            top = sorted(whole.items(), key=lambda kv: -kv[1])[:4]
            print(f"{label:>11} best: " + ", ".join(f"{c} {v:.0f}" for c, v in top), flush=True)
            results[label + "_best"] = top
            if top:
                bn, rest = top[0][0].split("x")
                bk, w = rest.split("w")
                tiles[label] = [int(bn), int(bk), int(w)]
    print("TORCHCHAT_GEMV_TILES=" + json.dumps(tiles))
    _save(a.out, "tiles.json", tiles)
    return results


# ------------------------------------------------------------------------------------------- profile
def cmd_profile(a) -> dict:
    """Where a decode step's time goes: engine tok/s (what `generate` reports), back-to-back replays
    of the captured graph (GPU time per token, no host in the loop), and per-kernel GPU time of one
    eager step (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions, CudaGraphStep

    rows = []
    for model in a.models:
        for q in a.quant:
            built = _build(model, a.tokenizers, True, quant=QUANT[q])
            prompt = built.tokenizer.encode(PROMPT, bos=True)
            engine = make_engine(built, CompileOptions(decode=True), max_seq_len=len(prompt) + 201)
            params = SamplingParams(temperature=0.8, top_k=200)
            cfg = GenerationConfig(max_new_tokens=200, sampling=params, stop_ids=frozenset())
            list(engine.tokens(prompt, cfg))  # capture
            list(engine.tokens(prompt, cfg))
            engine_tok_s = engine.last_stats.next_tokens_per_s
            step = engine.steps.decode(params)
            assert isinstance(step, CudaGraphStep)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(100):
                step._graph.replay()
            end.record()
            end.synchronize()
            graph_ms = start.elapsed_time(end) / 100
            # Per-kernel times of eager steps (same kernels, launched one by one).
            eager = make_engine(built, CompileOptions(decode=False), max_seq_len=len(prompt) + 201)
            short = GenerationConfig(max_new_tokens=4, sampling=params, stop_ids=frozenset())
            list(eager.tokens(prompt, short))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                list(eager.tokens(prompt, GenerationConfig(max_new_tokens=5, sampling=params, stop_ids=frozenset())))
            kernels = {}
            for ev in prof.key_averages():
                if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
                    # ms and calls per decode step (the prefill's kernels show apart, under their own names)
                    kernels[ev.key[:60]] = (ev.device_time_total / 1e3 / 4, ev.count / 4)
            top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:14]
            row = {"model": model, "quant": q, "engine_tok_s": engine_tok_s, "graph_ms_per_token": graph_ms,
                   "graph_tok_s": 1e3 / graph_ms, "kernels_ms_per_step": top}
            print(f"{model} {q}: engine {engine_tok_s:.1f} tok/s, graph replay {graph_ms:.3f} ms/token "
                  f"({1e3 / graph_ms:.1f} tok/s)", flush=True)
            for name, (ms, calls) in top:
                print(f"    {ms:8.3f} ms  {calls:6.1f} calls  {name}")
            rows.append(row)
            del built, engine, eager, step
            torch.cuda.empty_cache()
    return {"rows": rows}


# --------------------------------------------------------------------------------------------- check
def _build(model: str, data: Path, fused: bool, dtype: str = "bf16", quant: str | None = None,
           ckpt: Path | None = None):
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model

    plan = None
    if quant is not None:
        from torchchat.quantize import parse_quantize

        plan = parse_quantize(quant)
    if ckpt is not None:
        src = ModelSource(checkpoint_path=ckpt, tokenizer_path=ckpt.parent / "tok512.model")
    else:
        src = ModelSource(params_table=model, dummy_weights=True, tokenizer_path=_tokenizer(data, model))
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return build_model(BuildSpec(source=src, device="cuda", dtype=dt, quant=plan, cuda_kernels=fused))


def _greedy(built, prompt_ids, n: int, compiled: bool) -> list[int]:
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions

    engine = make_engine(built, CompileOptions(decode=compiled), max_seq_len=len(prompt_ids) + n + 1)
    cfg = GenerationConfig(max_new_tokens=n, sampling=SamplingParams(temperature=0.0), stop_ids=frozenset())
    return list(engine.tokens(prompt_ids, cfg))


def _margins(built, ids: list[int], prompt_len: int) -> list[float]:
    """Top-1 minus top-2 logit at each generated position of `ids` (teacher-forced, one forward)."""
    import torch

    built.runtime.setup(1, len(ids) + 1)
    with torch.no_grad():
        logits = built.runtime.forward(torch.tensor([ids], device="cuda"), torch.arange(len(ids), device="cuda"))
    top = logits[0, prompt_len - 1 : -1].float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def _compare(name: str, build, prompt_ids, n: int) -> dict:
    """Greedy tokens of the PyTorch modules (eager) against the fused model (CUDA graph, and eager),
    one model on the GPU at a time. A difference is explained by the reference's top-2 logit margin
    at that step: bf16 logits are rounded to 8 bits, so near-ties flip under any summation order."""
    import torch

    ref_built = build(False)
    ref = _greedy(ref_built, prompt_ids, n, compiled=False)
    margins = _margins(ref_built, prompt_ids + ref, len(prompt_ids))
    del ref_built
    torch.cuda.empty_cache()
    fast_built = build(True)
    assert fast_built.model.fused_kernels, fast_built.notes
    fast = _greedy(fast_built, prompt_ids, n, compiled=True)
    eager_fused = _greedy(fast_built, prompt_ids, n, compiled=False)
    del fast_built
    torch.cuda.empty_cache()
    diff = next((i for i, (x, y) in enumerate(zip(ref, fast)) if x != y), None)
    row = {"case": name, "tokens": n, "equal": ref == fast, "fused_graph_equals_fused_eager": fast == eager_fused,
           "first_difference": diff, "smallest_reference_margin": min(margins)}
    if diff is not None:
        row["reference_top1_minus_top2_at_difference"] = margins[diff]
    print(f"{name:<28} greedy {n} tokens: {'EQUAL' if row['equal'] else 'differ at ' + str(diff)}"
          + ("" if diff is None else f" (reference top-2 margin there {margins[diff]:.4f})")
          + f"; graph == eager fused: {row['fused_graph_equals_fused_eager']}", flush=True)
    return row


def cmd_check(a) -> dict:
    rows = []
    ckpt = a.stories / "stories260K.bin"
    golden = (a.stories / "expected_greedy_200.txt").read_text()
    for dtype in ("fp32", "bf16"):
        fast = _build("stories260K", a.tokenizers, True, dtype, ckpt=ckpt)
        bos = [fast.tokenizer.bos_id]
        if dtype == "fp32":
            text = fast.tokenizer.decode(_greedy(fast, bos, 200, compiled=True))
            print(f"{'stories260K fp32 vs llama2.c':<28} golden 200 tokens: {'EQUAL' if text == golden else 'DIFFER'}")
        del fast
        row = _compare(f"stories260K {dtype}",
                       lambda fused: _build("stories260K", a.tokenizers, fused, dtype, ckpt=ckpt), bos, 200)
        if dtype == "fp32":
            row["llama2c_golden"] = text == golden
        rows.append(row)
    for model in a.models:
        from torchchat.tokenizer.load import load_tokenizer

        prompt = load_tokenizer(_tokenizer(a.tokenizers, model)).encode(PROMPT, bos=True)
        for dtype in ("fp32", "bf16"):
            rows.append(_compare(f"{model} {dtype} random", lambda fused: _build(model, a.tokenizers, fused, dtype),
                                 prompt, 50))
    return {"rows": rows}


# -------------------------------------------------------------------------------------------- memory
def cmd_memory(a) -> dict:
    """Peak GPU memory while building (loading + quantizing) vs the final model + a 206-position KV cache."""
    import torch

    from torchchat.model.size import tensor_bytes

    rows = []
    for model in a.models:
        for q in a.quant:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            built = _build(model, a.tokenizers, not a.reference, quant=QUANT[q])
            torch.cuda.synchronize()
            peak_res, peak_alloc = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
            seen, weights = set(), 0
            for p in built.model.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    weights += tensor_bytes(p)
            cfg = built.config
            kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 206 * 2
            row = {"model": model, "quant": q, "weights_gb": weights / 1e9, "kv_gb": kv / 1e9,
                   "peak_reserved_gb": peak_res / 1e9, "peak_allocated_gb": peak_alloc / 1e9,
                   "ratio_reserved": peak_res / (weights + kv), "ratio_allocated": peak_alloc / (weights + kv)}
            print(f"{model:<16} {q:<5} model {row['weights_gb']:.2f} GB + kv {row['kv_gb']:.2f}: peak reserved "
                  f"{row['peak_reserved_gb']:.2f} GB ({row['ratio_reserved']:.3f}x), allocated "
                  f"{row['peak_allocated_gb']:.2f} GB ({row['ratio_allocated']:.3f}x)", flush=True)
            rows.append(row)
            del built
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ generate
def _run_cli(cmd: list[str], env: dict, timeout: float) -> tuple[float | None, float, str, int]:
    """Run; return (seconds to the first generated text, total seconds, stderr, returncode)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    first: list[float] = []
    err_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))
    drain.start()
    seen = b""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(1)
        if not chunk:
            break
        seen += chunk
        if not first and len(seen) > len(PROMPT.encode()):
            first.append(time.perf_counter() - t0)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    drain.join()
    err = b"".join(err_chunks).decode(errors="replace")
    return (first[0] if first else None), time.perf_counter() - t0, err, proc.returncode


def cmd_generate(a) -> dict:
    rows = []
    for model in a.models:
        for q in a.quant:
            for variant in a.variants:
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(os.environ, TRITON_CACHE_DIR=f"{cache}/triton",
                               TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", PYTHONUNBUFFERED="1")
                    row = {"model": model, "quant": q, "variant": variant}
                    for phase in ("cold", "warm")[: 2 if a.warm else 1]:
                        metrics = Path(cache) / f"{phase}.json"
                        cmd = [sys.executable, "torchchat.py", "generate", "--params-table", model, "--dummy-weights",
                               "--tokenizer-path", str(_tokenizer(a.tokenizers, model)),
                               "--device", "cuda", "--dtype", "bf16",
                               "--prompt", PROMPT, "--max-new-tokens", str(a.tokens), "--temperature", "0.8",
                               "--top-k", "200", "--num-samples", str(a.samples + 1), "--compile",
                               "--metrics-json", str(metrics)]
                        if QUANT[q]:
                            cmd += ["--quantize", QUANT[q]]
                        if variant == "reference":
                            cmd.append("--no-cuda-kernels")
                        first, total, err, rc = _run_cli(cmd, env, a.timeout)
                        if rc != 0 or not metrics.exists():
                            row[phase] = {"error": err[-1500:], "rc": rc}
                            print(f"{model} {q} {variant} {phase}: FAILED rc={rc}\n{err[-1500:]}", flush=True)
                            break
                        m = json.loads(metrics.read_text())
                        kept = [s for s in m["samples"] if not s["compile_sample"]]
                        row[phase] = {
                            "first_text_s": first, "total_s": total,
                            "compile_sample_s": m["samples"][0]["time_total_s"],
                            "median_tok_s": statistics.median(s["next_tokens_per_s"] for s in kept),
                            "rates": [s["next_tokens_per_s"] for s in kept],
                            "median_gb_s": m["median"]["bandwidth_gb_s"],
                            "model_bytes": m["model_bytes_per_token"], "peak_reserved_gb": m["peak_memory_bytes"] / 1e9,
                            "prompt_tokens": kept[0]["prompt_tokens"],
                        }
                        print(f"{model:<16} {q:<5} {variant:<9} {phase}: {row[phase]['median_tok_s']:.1f} tok/s "
                              f"({row[phase]['median_gb_s']:.0f} GB/s), first text at {first:.1f} s, "
                              f"prompt {row[phase]['prompt_tokens']} tokens", flush=True)
                    rows.append(row)
                    _save(a.out, "generate.json", rows)
    print("\nmodel            quant variant    tok/s   GB/s  cold 1st text  warm 1st text  peak GB")
    for r in rows:
        c, w = r.get("cold", {}), r.get("warm", {})
        if "median_tok_s" not in c:
            print(f"{r['model']:<16} {r['quant']:<5} {r['variant']:<9} failed")
            continue
        warm = f"{w['first_text_s']:.1f} s" if w.get("first_text_s") else "-"
        print(f"{r['model']:<16} {r['quant']:<5} {r['variant']:<9} {c['median_tok_s']:6.1f} {c['median_gb_s']:6.0f} "
              f"{c['first_text_s']:10.1f} s {warm:>12}  {c['peak_reserved_gb']:7.2f}")
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["env", "kernels", "profile", "check", "memory", "generate"], nargs="+")
    p.add_argument("--models", nargs="+", default=["7B", "Meta-Llama-3-8B"])
    p.add_argument("--quant", nargs="+", default=["bf16", "int8", "int4"], choices=list(QUANT))
    p.add_argument("--formats", nargs="+", default=["float", "int8", "int4"])
    p.add_argument("--variants", nargs="+", default=["fused"], choices=["fused", "reference"],
                   help="fused: torchchat's kernels; reference: --no-cuda-kernels "
                        "(PyTorch modules, torchao, torch.compile)")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--warm", action="store_true", help="generate: run each configuration a second time on warm caches")
    p.add_argument("--reference", action="store_true", help="memory: measure the --no-cuda-kernels build")
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument("--tokenizers", type=Path, default=SHARED / "tokenizers", help="folder with llama2/ and llama3/")
    p.add_argument("--stories", type=Path, default=SHARED / "models" / "stories260K", help="stories260K folder")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    kmodels = {"7B": "7B", "Meta-Llama-3-8B": "8B"}
    for what in a.what:
        print(f"== {what}", flush=True)
        if what == "kernels":
            a_k = argparse.Namespace(**vars(a))
            a_k.models = [kmodels[m] for m in a.models]
            res = cmd_kernels(a_k)
        else:
            res = {"env": cmd_env, "profile": cmd_profile, "check": cmd_check, "memory": cmd_memory,
                   "generate": cmd_generate}[what](a)
        _save(a.out, f"{what}.json", res)


if __name__ == "__main__":
    main()
