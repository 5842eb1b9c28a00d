"""Greedy text of torchchat against llama.cpp on GGUFs of Llama's relatives (a reference run, not a test).

For each family of tests/checkpoint/test_gguf_families.py: a tiny random HF folder, converted to GGUF
(f32) by llama.cpp's convert_hf_to_gguf.py, then the same prompt decoded greedily by `llama-simple` and
by torchchat (GGUF weights and GGUF tokenizer, eager fp32). Prints one line per family.

    python bench/llamacpp_families.py [--llamacpp /work/llamacpp] [--tokens 24] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time there was a little robot"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llamacpp", type=Path, default=Path(os.environ.get("TORCHCHAT_LLAMACPP", ROOT.parent / "llamacpp")))
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests" / "checkpoint"))
    import torch

    from hf_family_folders import write_folder
    from llamacpp_tools import token_bytes
    from test_gguf_families import GGUF_CASES

    from torchchat.build import BuildSpec, ModelSource, build_model
    from torchchat.generation.engine import GenerationConfig, make_engine
    from torchchat.generation.sampling import SamplingParams

    out = args.out or Path(tempfile.mkdtemp(prefix="families-"))
    jobs = []
    # Neutral folder names: the converter names the model after its folder, and llama.cpp's vocabulary
    # loader applies Phi-3 SentencePiece token rules (and fails on a vocabulary without "</s>") to any
    # model whose name contains "phi3".
    folders = {case: out / f"tiny{i}" for i, case in enumerate(GGUF_CASES)}
    for case, (arch, family, pre, (config_cls, model_cls, kwargs)) in GGUF_CASES.items():
        folder = folders[case]
        folder.mkdir(parents=True, exist_ok=True)
        write_folder(folder, config_cls, model_cls, {k: v for k, v in kwargs.items() if v is not None}, family)
        jobs += [str(folder), str(folder / "model.gguf"), pre]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "checkpoint" / "llamacpp_convert.py"),
                    str(args.llamacpp / "src"), *jobs], check=True, env=env, capture_output=True)
    greedy = GenerationConfig(max_new_tokens=args.tokens, sampling=SamplingParams(temperature=0), stop_ids=frozenset())
    same = 0
    for case in GGUF_CASES:
        gguf = folders[case] / "model.gguf"
        ref = subprocess.run([str(args.llamacpp / "bin" / "llama-simple"), "-m", str(gguf), "-n", str(args.tokens), PROMPT],
                             capture_output=True)
        theirs = ref.stdout  # raw bytes: the prompt, then each generated token's bytes
        built = build_model(BuildSpec(source=ModelSource(gguf_path=gguf), dtype=torch.float32, max_seq_len=128))
        tok = built.tokenizer
        ids = tok.encode(PROMPT, bos=tok.add_bos if hasattr(tok, "add_bos") else False)
        new = list(make_engine(built, max_seq_len=128).tokens(ids, greedy))
        # Compared as bytes (a random model's tokens are often pieces of UTF-8 characters).
        ours = PROMPT.encode() + token_bytes(gguf, new)
        ok = theirs.strip() == ours.strip()
        same += ok
        print(f"{case:8s} {'SAME' if ok else 'DIFFERENT'}  {len(new)} tokens {new[:8]}...  bytes={ours[len(PROMPT):]!r}")
        if not ok:
            print(f"{'':8s} llama.cpp={theirs!r}\n{'':8s} stderr tail={ref.stderr[-300:]!r}")
    print(f"{same}/{len(GGUF_CASES)} families give llama.cpp's greedy text ({args.tokens} tokens, f32 GGUF)")
    return 0 if same == len(GGUF_CASES) else 1


if __name__ == "__main__":
    raise SystemExit(main())
