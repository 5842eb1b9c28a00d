"""GPU decode benchmark for the fused CUDA path (torchchat/kernels), in one script so a
whole session on a lent GPU is one command. Results go to stdout (a short table last) and, with
--out DIR, to JSON files there.

    PYTHONPATH=. python3 bench/gpu_bench.py env          # versions, device-copy bandwidth, torchao import
    PYTHONPATH=. python3 bench/gpu_bench.py profile      # engine vs graph-replay time per token; kernel table
    PYTHONPATH=. python3 bench/gpu_bench.py generate     # `torchchat.py generate` tok/s, cold/warm start
    PYTHONPATH=. python3 bench/gpu_bench.py generate --quant --gguf Q4_0 Q8_0 Q4_K Q6_K   # GGUF files

The GEMV tile sweep is `python -m torchchat.kernels.tune`; the correctness and build-memory checks
are tests (tests/kernels/test_cuda_models.py, skipped without a GPU).

`generate` runs the real CLI in subprocesses, the reference method of issue 10: random weights
(--dummy-weights), batch 1, a 6-token prompt, 200 new tokens, temperature 0.8, top-k 200, --compile,
median over 5 samples after one compile/warm-up sample. Each configuration runs twice: first with
empty Triton/Inductor caches (cold), then again with the caches it left (warm); time to first token is
measured from process start to the first generated text on stdout. `--gguf TYPE...` adds GGUF files of
each model's shape in those block types (random blocks, bench/gguf_random.py), run with `--gguf-path`:
on the fused path their integers are transcoded (docs/gguf.md); `--variants reference` shows how they
ran before (--no-cuda-kernels: dequantized to bf16, Q4_0 on torchao's int4 kernel). `--variants aoti`
exports the same build with `--device cuda` to a .pt2 (timed) and runs `generate --aoti-package-path` on it.
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
# Positions an exported package holds (its KV cache is fixed at export): the prompt and 200 new tokens fit.
EXPORT_CONTEXT = 1024
GGUF_KINDS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # bench/gguf_random.py


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


# ------------------------------------------------------------------------------------------- profile
def _build(model: str, tokenizers: Path, quant: str | None):
    """The fused bf16 model of a params table's shape, random weights, on the GPU."""
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model

    plan = None
    if quant is not None:
        from torchchat.quantize import parse_quantize

        plan = parse_quantize(quant)
    src = ModelSource(params_table=model, dummy_weights=True, tokenizer_path=_tokenizer(tokenizers, model))
    return build_model(BuildSpec(source=src, device="cuda", dtype=torch.bfloat16, quant=plan))


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
            built = _build(model, a.tokenizers, QUANT[q])
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


def _export(build: list[str], pt2: Path, env: dict, timeout: float) -> tuple[float, str, int]:
    """`torchchat.py export` of the same build to a CUDA .pt2: (seconds, stderr, returncode)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "torchchat.py", "export", *build, "--max-seq-length", str(EXPORT_CONTEXT),
                           "--output-aoti-package-path", str(pt2)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)
    return time.perf_counter() - t0, done.stderr, done.returncode


def cmd_generate(a) -> dict:
    from gguf_random import write_random_gguf

    rows = []
    files = tempfile.TemporaryDirectory()  # one GGUF file at a time (4-7 GB at 7B), removed after its runs
    for model in a.models:
        configs = [(q, QUANT[q], None) for q in a.quant] + [(f"gguf:{kind}", None, kind) for kind in a.gguf]
        for q, recipe, kind in configs:
            gguf = write_random_gguf(Path(files.name) / f"{model}-{kind}.gguf", model, kind) if kind else None
            for variant in a.variants:
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(os.environ, TRITON_CACHE_DIR=f"{cache}/triton",
                               TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", PYTHONUNBUFFERED="1")
                    row = {"model": model, "quant": q, "variant": variant}
                    for phase in ("cold", "warm")[: 2 if a.warm else 1]:
                        metrics = Path(cache) / f"{phase}.json"
                        weights = (["--gguf-path", str(gguf)] if gguf is not None
                                   else ["--params-table", model, "--dummy-weights"])
                        build = [*weights, "--device", "cuda", "--dtype", "bf16", *(["--quantize", recipe] if recipe else [])]
                        tokenizer = ["--tokenizer-path", str(_tokenizer(a.tokenizers, model))]
                        if variant == "aoti" and phase == "cold":
                            export_s, err, rc = _export([*build, *tokenizer], Path(cache) / "model.pt2", env, a.timeout)
                            row["export_s"] = export_s
                            if rc != 0:
                                row[phase] = {"error": err[-1500:], "rc": rc}
                                print(f"{model} {q} aoti export: FAILED rc={rc}\n{err[-1500:]}", flush=True)
                                break
                        sampling = ["--prompt", PROMPT, "--max-new-tokens", str(a.tokens), "--temperature", "0.8",
                                    "--top-k", "200", "--num-samples", str(a.samples + 1), "--serial-samples",
                                    "--metrics-json", str(metrics)]
                        if variant == "aoti":  # the package holds the weights, dtype and recipe; no --compile
                            cmd = [sys.executable, "torchchat.py", "generate", "--aoti-package-path",
                                   str(Path(cache) / "model.pt2"), "--device", "cuda", *tokenizer, *sampling]
                        else:
                            cmd = [sys.executable, "torchchat.py", "generate", *build, *tokenizer, *sampling, "--compile"]
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
                        print(f"{model:<16} {q:<9} {variant:<9} {phase}: {row[phase]['median_tok_s']:.1f} tok/s "
                              f"({row[phase]['median_gb_s']:.0f} GB/s), first text at {first:.1f} s, "
                              f"prompt {row[phase]['prompt_tokens']} tokens", flush=True)
                    rows.append(row)
                    _save(a.out, "generate.json", rows)
            if gguf is not None:
                gguf.unlink()
    files.cleanup()
    print("\nmodel            quant     variant    tok/s   GB/s  cold 1st text  warm 1st text  peak GB")
    for r in rows:
        c, w = r.get("cold", {}), r.get("warm", {})
        if "median_tok_s" not in c:
            print(f"{r['model']:<16} {r['quant']:<9} {r['variant']:<9} failed")
            continue
        warm = f"{w['first_text_s']:.1f} s" if w.get("first_text_s") else "-"
        print(f"{r['model']:<16} {r['quant']:<9} {r['variant']:<9} {c['median_tok_s']:6.1f} {c['median_gb_s']:6.0f} "
              f"{c['first_text_s']:10.1f} s {warm:>12}  {c['peak_reserved_gb']:7.2f}"
              + (f"  (export {r['export_s']:.0f} s)" if "export_s" in r else ""))
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["env", "profile", "generate"], nargs="+")
    p.add_argument("--models", nargs="+", default=["7B", "Meta-Llama-3-8B"])
    p.add_argument("--quant", nargs="*", default=["bf16", "int8", "int4"], choices=list(QUANT))
    p.add_argument("--gguf", nargs="*", default=[], choices=list(GGUF_KINDS),
                   help="generate: also GGUF files of each model's shape in these block types (random blocks)")
    p.add_argument("--variants", nargs="+", default=["fused"], choices=["fused", "reference", "aoti"],
                   help="fused: torchchat's kernels; reference: --no-cuda-kernels "
                        "(PyTorch modules, torchao, torch.compile)")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--warm", action="store_true", help="generate: run each configuration a second time on warm caches")
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument("--tokenizers", type=Path, default=SHARED / "tokenizers", help="folder with llama2/ and llama3/")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    for what in a.what:
        print(f"== {what}", flush=True)
        res = {"env": cmd_env, "profile": cmd_profile, "generate": cmd_generate}[what](a)
        _save(a.out, f"{what}.json", res)


if __name__ == "__main__":
    main()
