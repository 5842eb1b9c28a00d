"""Run llama.cpp's convert_hf_to_gguf.py on tiny test folders, all in one process (a subprocess:
`python llamacpp_convert.py LLAMACPP_SRC HF_DIR OUT.gguf PRE [HF_DIR OUT.gguf PRE ...]`).

The converter names a BPE vocabulary's pre-tokenizer by hashing how it tokenizes a check string, which
only real vocabularies pass, and reads Gemma 2's vocabulary from a SentencePiece file; the tiny folders
hold a small byte-level BPE tokenizer.json, so the pre-tokenizer name is given (`PRE`) and every family
reads tokenizer.json. Weights and metadata go through the converter unchanged."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    src, jobs = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, str(Path(src) / "gguf-py"))
    sys.path.insert(0, src)
    from conversion import base, gemma, phi

    for cls in (gemma.Gemma2Model, gemma.Gemma3Model, phi.Phi3MiniModel):
        cls.set_vocab = lambda self: self._set_vocab_gpt2()
    for i in range(0, len(jobs), 3):
        hf_dir, out, pre = jobs[i : i + 3]
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer, pre=pre: pre
        sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", out]
        runpy.run_path(str(Path(src) / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
