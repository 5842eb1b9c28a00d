"""llama.cpp's tools for tests: where they are, its converter run on tiny folders (llamacpp_convert.py),
llama-quantize, and llama-simple's greedy continuation as bytes. TORCHCHAT_LLAMACPP (default
../llamacpp beside the project; tools/build_llamacpp.sh makes it) holds src/ and bin/."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LLAMACPP = Path(os.environ.get("TORCHCHAT_LLAMACPP", Path(__file__).resolve().parents[3] / "llamacpp"))
CONVERTER = LLAMACPP / "src" / "convert_hf_to_gguf.py"
BIN = LLAMACPP / "bin"


def missing(*tools: str) -> str | None:
    """Why the given tools ("convert", "llama-quantize", "llama-simple") cannot run here, or None."""
    for tool in tools:
        path = CONVERTER if tool == "convert" else BIN / tool
        if not path.is_file():
            return f"llama.cpp's {tool} not found at {path} (set TORCHCHAT_LLAMACPP; tools/build_llamacpp.sh builds it)"
    return None


def convert(jobs: list[tuple[Path, Path, str]]) -> None:
    """(HF folder, out.gguf, tokenizer.ggml.pre) for each job, f32, all in one converter process."""
    args = [str(x) for job in jobs for x in job]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the converter's own gguf-py, not ours
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("llamacpp_convert.py")), str(LLAMACPP / "src"),
                           *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def quantize(src: Path, dst: Path, ftype: str) -> None:
    """llama-quantize src -> dst as `ftype` (Q8_0, Q4_0, Q4_K_M, ...)."""
    done = subprocess.run([str(BIN / "llama-quantize"), str(src), str(dst), ftype, "1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-1000:]


def simple_greedy(gguf: Path, prompt: str, n: int) -> bytes:
    """llama-simple's stdout: the prompt, then `n` greedy tokens, as raw bytes."""
    done = subprocess.run([str(BIN / "llama-simple"), "-m", str(gguf), "-n", str(n), prompt], capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    return done.stdout


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


def pieces_bytes(pieces: list[str]) -> bytes:
    """Byte-level BPE token texts (GPT-2's printable characters) -> the bytes they stand for; a piece
    outside that alphabet (a special token) as its own text."""
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    return b"".join(bytes(byte_of[c] for c in p) if all(c in byte_of for c in p) else p.encode() for p in pieces)


def token_bytes(gguf: Path, ids: list[int]) -> bytes:
    """The bytes llama.cpp prints for `ids` of a byte-level BPE GGUF vocabulary (special tokens as their
    text): a random model's tokens are often pieces of UTF-8 characters, so text is compared as bytes."""
    from gguf import GGUFReader

    pieces = [str(p) for p in GGUFReader(gguf).fields["tokenizer.ggml.tokens"].contents()]
    return pieces_bytes([pieces[i] for i in ids])
