"""Exported models against eager and --compile at real shapes with random weights: export time, load
time and batch-1 decode speed of a .pt2 (AOT Inductor) and a .pte (ExecuTorch + XNNPACK).

For each shape it writes a random-weight checkpoint (so eager loads a file as the artifacts do), exports
it with the real CLI (`torchchat.py export`, timed as a whole, `--export-runs` times), times loading each
form (`build_model`: the artifact or checkpoint plus the tokenizer; median of `--runs`), and runs the
real `generate` CLI greedily for `--tokens` tokens `--runs` times (one warm-up sample more, not counted;
for --compile it is the compile sample) and reports the median next-token throughput.

    python3 bench/export_bench.py                          # stories15M and stories110M, fp32
    python3 bench/export_bench.py --shapes stories15M --runs 5 --export-runs 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import CLI, ROOT, SHARED, run

FORMS = {  # form -> (export flag, run flag, file name)
    "pt2": ("--output-aoti-package-path", "--aoti-package-path", "model.pt2"),
    "pte": ("--output-pte-path", "--pte-path", "model.pte"),
}


def write_checkpoint(shape: str, tokenizer: Path, folder: Path) -> Path:
    """A random-weight fp32 checkpoint of the params table `shape`, with its params beside it."""
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model

    built = build_model(BuildSpec(ModelSource(params_table=shape, dummy_weights=True, tokenizer_path=tokenizer),
                                  dtype=torch.float32))
    path = folder / f"{shape}.pth"
    torch.save(built.model.state_dict(), path)
    return path


def median_load_seconds(source_kwargs: dict, runs: int) -> float:
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model

    exported = "checkpoint_path" not in source_kwargs
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        build_model(BuildSpec(ModelSource(**source_kwargs), dtype=None if exported else torch.float32))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_tok_s(source: list[str], runs: int, tokens: int, compile_: bool, folder: Path) -> float:
    metrics = folder / "metrics.json"
    cmd = [*CLI, "generate", *source, "--temperature", "0", "--prompt", "Once upon a time", "--max-new-tokens",
           str(tokens), "--num-samples", str(runs + 1), "--metrics-json", str(metrics)]
    if compile_:
        cmd.append("--compile")
    run(cmd, cwd=ROOT)
    samples = json.loads(metrics.read_text())["samples"][1:]  # the first is a warm-up (or compile) sample
    assert all(s["generated_tokens"] == tokens for s in samples)
    return statistics.median(s["next_tokens_per_s"] for s in samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["stories15M", "stories110M"])
    p.add_argument("--forms", nargs="+", default=["eager", "compile", "pt2", "pte"],
                   choices=["eager", "compile", *FORMS])
    p.add_argument("--runs", type=int, default=5, help="load and decode repetitions (median)")
    p.add_argument("--export-runs", type=int, default=1, help="exports of each artifact (median)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--max-seq-length", type=int, default=256, help="KV cache positions of the exports")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama2" / "tokenizer.model")
    a = p.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; fp32; median of {a.runs} load/decode runs x {a.tokens} "
          f"tokens, {a.export_runs} export run(s)")
    print(f"{'shape':<12} {'form':<8} {'export s':>9} {'MB':>7} {'load s':>8} {'decode tok/s':>13}", flush=True)
    for shape in a.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            checkpoint = write_checkpoint(shape, a.tokenizer, folder)
            source = ["--checkpoint-path", str(checkpoint), "--params-table", shape, "--tokenizer-path", str(a.tokenizer)]
            for form in a.forms:
                if form in FORMS:
                    out_flag, run_flag, name = FORMS[form]
                    path = folder / name
                    export_times = []
                    for _ in range(a.export_runs):
                        start = time.perf_counter()
                        run([*CLI, "export", *source, out_flag, str(path), "--max-seq-length", str(a.max_seq_length)],
                            cwd=ROOT)
                        export_times.append(time.perf_counter() - start)
                    export_s = f"{statistics.median(export_times):9.1f}"
                    size = f"{path.stat().st_size / 1e6:7.1f}"
                    load = median_load_seconds({run_flag.lstrip('-').replace('-', '_'): path,
                                                "tokenizer_path": a.tokenizer}, a.runs)
                    form_source = [run_flag, str(path), "--tokenizer-path", str(a.tokenizer)]
                    rate = decode_tok_s(form_source, a.runs, a.tokens, False, folder)
                else:
                    export_s, size = f"{'-':>9}", f"{checkpoint.stat().st_size / 1e6:7.1f}"
                    load = median_load_seconds({"checkpoint_path": checkpoint, "params_table": shape,
                                                "tokenizer_path": a.tokenizer}, a.runs)
                    rate = decode_tok_s([*source, "--dtype", "fp32"], a.runs, a.tokens, form == "compile", folder)
                print(f"{shape:<12} {form:<8} {export_s} {size} {load:8.3f} {rate:13.1f}", flush=True)


if __name__ == "__main__":
    main()
