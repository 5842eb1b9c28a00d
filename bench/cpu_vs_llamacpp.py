"""torchchat against llama.cpp on the CPU, on the same GGUF files, interleaved round by round.

For each file and thread count T, each round runs `llama-bench -p 128 -n 128 -t T` and then torchchat
(in a fresh process, T torch threads) on the same file: prefill of 128 tokens in one forward, then 128
greedy decode steps from position 0 (llama-bench's tg128 also starts from an empty context). torchchat
runs eager and, with --modes compile, `--compile`'s decode step; the table reports the faster. The
table gives medians over the rounds and the load average seen before and after, and the resident
memory of torchchat's weight storages (pages present, from /proc/self/pagemap) beside the file's size.

Builds nothing. Files: `{shape}-{TYPE}.gguf` in --models (the stories15M/110M-shaped ones made by
../shared/tools/make_gguf_models.sh, e.g. s15m-Q4_0.gguf). The Llama-3.2-1B-shaped files (`l1b-*.gguf`)
are made here if missing: random F16 weights written with the `gguf` package (tied embeddings,
vocabulary 128256), quantized by the given llama.cpp's own llama-quantize; other missing types of
any shape are quantized from its F16 file the same way.

    python3 bench/cpu_vs_llamacpp.py /work/llamacpp/bin /work/llamacpp/models
    python3 bench/cpu_vs_llamacpp.py BIN MODELS --shapes s15m s110m l1b --types Q8_0 Q4_0 Q4_K_M --threads 1 2 --rounds 3
    python3 bench/cpu_vs_llamacpp.py BIN MODELS --types Q4_0 --baseline ../main   # before/after, interleaved
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

ROOT = Path(__file__).resolve().parent.parent
PROMPT = 128
GEN = 128
# llama-quantize's names for the file types; Q4_1 and Q5_K_M have no stories-shaped file from
# make_gguf_models.sh, so the l1b shape is the one that has them all.
TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K")
L1B = dict(dim=2048, layers=16, heads=32, kv_heads=8, hidden=8192, vocab=128256, ctx=2048, rope_base=500000.0)


def write_l1b_f16(path: Path, seed: int = 0) -> None:
    """A Llama-3.2-1B-shaped GGUF (llama architecture, tied embeddings) with N(0, 0.02) F16 weights
    and a placeholder SentencePiece-style vocabulary (llama-bench never tokenizes text; torchchat needs
    one to build the model)."""
    import gguf
    import numpy as np

    c = L1B
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-llama-3.2-1b-shape")
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["dim"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["hidden"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_dimension_count(c["dim"] // c["heads"])
    w.add_rope_freq_base(c["rope_base"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(c["vocab"] - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)

    dim, hd = c["dim"], c["dim"] // c["heads"]
    w.add_tensor("token_embd.weight", rand(c["vocab"], dim))
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for i in range(c["layers"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", rand(c["heads"] * hd, dim))
        w.add_tensor(p + "attn_k.weight", rand(c["kv_heads"] * hd, dim))
        w.add_tensor(p + "attn_v.weight", rand(c["kv_heads"] * hd, dim))
        w.add_tensor(p + "attn_output.weight", rand(dim, c["heads"] * hd))
        w.add_tensor(p + "ffn_gate.weight", rand(c["hidden"], dim))
        w.add_tensor(p + "ffn_up.weight", rand(c["hidden"], dim))
        w.add_tensor(p + "ffn_down.weight", rand(dim, c["hidden"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def ensure_file(models: Path, shape: str, qtype: str, bin_dir: Path) -> Path:
    path = models / f"{shape}-{qtype}.gguf"
    if path.is_file():
        return path
    f16 = models / f"{shape}-F16.gguf"
    if shape != "l1b" and not f16.is_file():
        raise SystemExit(f"{path} is missing (../shared/tools/make_gguf_models.sh makes the stories-shaped files)")
    if not f16.is_file():
        print(f"writing {f16} (random weights) ...", flush=True)
        write_l1b_f16(f16)
    if qtype != "F16":
        print(f"llama-quantize {f16.name} -> {path.name} ...", flush=True)
        subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(path), qtype], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def llama_bench(bin_dir: Path, path: Path, threads: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from one llama-bench run of pp{PROMPT} and tg{GEN}, one repetition."""
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(path), "-p", str(PROMPT), "-n", str(GEN),
                          "-t", str(threads), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == PROMPT and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == GEN and r["n_prompt"] == 0)
    return pp, tg


def torchchat_run(path: Path, threads: int, mode: str, dtype: str, root: Path = ROOT) -> dict:
    """One worker process of the checkout at `root` (this one by default, whatever is installed):
    {"prefill": tok/s, "decode": tok/s, "rss_mb": ..., "notes": [...]}."""
    cmd = [sys.executable, str(root / "bench" / Path(__file__).name), "--worker", str(path), "--threads", str(threads),
           "--mode", mode, "--dtype", dtype, "--prompt", str(PROMPT), "--gen", str(GEN)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if out.returncode != 0:
        raise SystemExit(f"torchchat worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(path: Path, threads: int, mode: str, dtype: str) -> None:
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model, resolve_dtype
    from torchchat.generation.engine import make_engine
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions

    rss_before = _rss_mb()  # torch and torchchat imported, no model yet
    built = build_model(BuildSpec(ModelSource(gguf_path=path), dtype=resolve_dtype(dtype, "cpu"), max_seq_len=512,
                                  num_threads=threads))
    engine = make_engine(built, CompileOptions(decode=mode == "compile"))
    rt = built.runtime
    rt.setup(1, 512)
    params = SamplingParams(temperature=0.0)
    prefill, decode = engine.steps.prefill(params), engine.steps.decode(params)
    vocab = built.config.vocab_size
    prompt = torch.randint(3, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def run_prefill() -> float:
        start = time.perf_counter()
        prefill(prompt, torch.arange(PROMPT))
        return PROMPT / (time.perf_counter() - start)

    def run_decode(steps: int) -> float:
        tok = prefill(prompt[:, :1], torch.arange(1))
        pos = torch.ones(1, dtype=torch.int64)
        tok = decode(tok, pos)  # compiles on the first call
        start = time.perf_counter()
        for _ in range(steps):
            pos += 1
            tok = decode(tok.clone(), pos)
        return steps / (time.perf_counter() - start)

    with torch.no_grad():
        run_prefill()  # warm-up (first-call allocations; caches already set up)
        pp = max(run_prefill() for _ in range(2))
        run_decode(4)  # warm-up (and the compile)
        tg = run_decode(GEN)
    weights, mapped = weights_resident_mb(built.model, path)
    print(json.dumps({"prefill": pp, "decode": tg, "rss_mb": _rss_mb() - rss_before, "weights_mb": weights,
                      "file_mapped_mb": mapped, "notes": built.notes}))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def weights_resident_mb(model, path: Path) -> tuple[float, float]:
    """(resident MB of the model's parameter storages, resident MB of mappings of the GGUF file itself):
    what the weights really occupy, apart from torch's libraries, the tokenizer and the KV cache that the
    process's total also counts. Pages are counted from /proc/self/pagemap (bit 63: present), each
    storage's own page range only; the file's mappings from /proc/self/smaps."""
    import struct

    page = os.sysconf("SC_PAGE_SIZE")
    storages = {}
    for p in model.parameters():
        st = p.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    resident = 0
    with open("/proc/self/pagemap", "rb") as pm:
        for ptr, nbytes in storages.items():
            first, last = ptr // page, (ptr + nbytes - 1) // page
            pm.seek(first * 8)
            entries = struct.unpack(f"{last - first + 1}Q", pm.read((last - first + 1) * 8))
            resident += sum(1 for e in entries if e >> 63) * page
    mapped = 0
    name = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
        elif head[0] == "Rss:" and name == str(path.resolve()):
            mapped += int(head[1]) * 1024
    return resident / 2**20, mapped / 2**20


def main() -> None:
    global PROMPT, GEN
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bin_dir", type=Path, nargs="?", help="llama.cpp's bin folder (llama-bench, llama-quantize)")
    p.add_argument("models", type=Path, nargs="?", help="folder of GGUF files ({shape}-{TYPE}.gguf)")
    p.add_argument("--shapes", nargs="+", default=["s15m", "s110m", "l1b"])
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K_M", "Q6_K"], choices=TYPES)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="torchchat's activations")
    p.add_argument("--prompt", type=int, default=PROMPT, help="prefill length (llama-bench -p)")
    p.add_argument("--gen", type=int, default=GEN, help="decode steps (llama-bench -n)")
    p.add_argument("--baseline", type=Path, help="another torchchat checkout (e.g. main's) whose worker runs right "
                   "after this one's in every round: before/after columns measured interleaved")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    a = p.parse_args()
    PROMPT, GEN = a.prompt, a.gen
    if a.worker is not None:
        worker(a.worker, a.threads[0], a.mode, a.dtype)
        return
    if a.bin_dir is None or a.models is None:
        p.error("give the llama.cpp bin folder and the models folder")
    load_before = os.getloadavg()
    rows = []
    for shape in a.shapes:
        for qtype in a.types:
            path = ensure_file(a.models, shape, qtype, a.bin_dir)
            for threads in a.threads:
                lc_pp, lc_tg, tc_pp, tc_tg, rss, base_tg, base_pp = [], [], [], [], [], [], []
                for _ in range(a.rounds):
                    pp, tg = llama_bench(a.bin_dir, path, threads)
                    lc_pp.append(pp)
                    lc_tg.append(tg)
                    best = max((torchchat_run(path, threads, m, a.dtype) | {"mode": m} for m in a.modes),
                               key=lambda r: r["decode"])
                    tc_pp.append(best["prefill"])
                    tc_tg.append(best["decode"])
                    rss.append(best["weights_mb"])
                    if a.baseline is not None:
                        base = max((torchchat_run(path, threads, m, a.dtype, a.baseline.resolve()) for m in a.modes),
                                   key=lambda r: r["decode"])
                        base_tg.append(base["decode"])
                        base_pp.append(base["prefill"])
                med = statistics.median
                row = (shape, qtype, threads, med(lc_tg), med(tc_tg), med(lc_pp), med(tc_pp), max(rss),
                       path.stat().st_size / 2**20, med(base_tg) if base_tg else None, med(base_pp) if base_pp else None)
                rows.append(row)
                print(f"  {shape} {qtype} t{threads}: llama.cpp tg {lc_tg} pp {lc_pp}; torchchat tg "
                      f"{[round(x, 1) for x in tc_tg]} pp {[round(x, 1) for x in tc_pp]}"
                      + (f"; baseline tg {[round(x, 1) for x in base_tg]} pp {[round(x, 1) for x in base_pp]}"
                         if base_tg else ""), file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"\ntorchchat {a.dtype}, best of {'/'.join(a.modes)}; prefill {PROMPT} / decode {GEN} tokens; medians of "
          f"{a.rounds} rounds; load average "
          f"(1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.2f}' for x in load_after)}\n")
    base_head = " baseline decode | ratio | baseline prefill | ratio |" if a.baseline is not None else ""
    print("| shape | type | threads | llama.cpp decode | torchchat decode | ratio | llama.cpp prefill | "
          "torchchat prefill | ratio | torchchat weights resident MB | file MB |" + base_head)
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" * 4 if a.baseline is not None else ""))
    for shape, qtype, t, lt, tt, lp, tp, rss, size, bt, bp in rows:
        base = f" {bt:.1f} | {bt / lt:.2f} | {bp:.1f} | {bp / lp:.2f} |" if bt is not None else ""
        print(f"| {shape} | {qtype} | {t} | {lt:.1f} | {tt:.1f} | {tt / lt:.2f} | {lp:.1f} | {tp:.1f} | {tp / lp:.2f} "
              f"| {rss:.0f} | {size:.0f} |" + base)


if __name__ == "__main__":
    main()
