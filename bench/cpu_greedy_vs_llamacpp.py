"""Greedy text of torchchat's packed GGUF path against llama.cpp's on the same file (reported, not a
CI test: it needs llama.cpp's tools).

llama-simple (greedy) continues the prompt; torchchat then reads llama.cpp's whole token sequence in one
forward pass (teacher forcing), and the report gives the fraction of positions where torchchat's top-1
next token is the one llama.cpp chose, and whether torchchat's own greedy text is identical.

    python3 bench/cpu_greedy_vs_llamacpp.py /work/llamacpp/bin model-Q8_0.gguf [more.gguf ...] --tokens 100
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def llama_simple(bin_dir: Path, path: Path, prompt: str, n: int) -> str:
    out = subprocess.run([str(bin_dir / "llama-simple"), "-m", str(path), "-n", str(n), prompt],
                         capture_output=True, check=True)
    # A random model's pieces may be lone bytes of a UTF-8 sequence: those read as U+FFFD, so the
    # re-tokenized text differs from llama.cpp's ids there (both programs are compared on the same text).
    return out.stdout.decode("utf-8", errors="replace")


def main() -> None:
    import torch

    from torchchat.build import BuildSpec, ModelSource, build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bin_dir", type=Path)
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-cpu-kernels", action="store_true", help="dequantized float weights instead (a reference)")
    a = p.parse_args()
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    print("| file | tokens compared | teacher-forced top-1 agreement | first differing position (own greedy) |")
    print("|---|---|---|---|")
    for path in a.models:
        text = llama_simple(a.bin_dir, path, a.prompt, a.tokens)
        built = build_model(BuildSpec(ModelSource(gguf_path=path), dtype=dtype, max_seq_len=a.tokens + 64,
                                      cpu_kernels=not a.no_cpu_kernels))
        tok, model = built.tokenizer, built.model
        from torchchat.model.layout import optimize_for_decode

        optimize_for_decode(model)  # what generate runs: stacked, interleaved weights, native decode attention
        body = text.split("<s>", 1)[-1].lstrip() if "<s>" in text else text
        # Re-tokenizing the printed text: the last piece may be cut short by the token limit, so it is dropped.
        ids = tok.encode(body, bos=True)[: a.tokens + 16][:-1]
        prompt_len = len(tok.encode(a.prompt, bos=True))
        model.setup_caches(1, len(ids) + 1)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0]
        pred = logits.argmax(-1)[prompt_len - 1 : -1]
        target = torch.tensor(ids[prompt_len:])
        agree = (pred == target).float().mean().item()
        # torchchat's own greedy continuation, step by step through the KV cache
        own = list(ids[:prompt_len])
        model.setup_caches(1, len(ids) + 1)
        with torch.no_grad():
            out = model(torch.tensor([own]), torch.arange(len(own)))
            for i in range(len(ids) - prompt_len):
                nxt = int(out[0, -1].argmax())
                own.append(nxt)
                out = model(torch.tensor([[nxt]]), torch.tensor([len(own) - 1]))
        diff = next((i - prompt_len for i in range(prompt_len, len(ids)) if own[i] != ids[i]), None)
        print(f"| {path.name} | {len(target)} | {agree:.3f} | {'none (identical)' if diff is None else diff} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
