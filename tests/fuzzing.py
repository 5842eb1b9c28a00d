"""Seeded, bounded fuzzing of every parser of untrusted input: each case must end in valid output or
one TorchchatError whose message is one line; anything else (another exception, a multi-line error,
a case running past its time limit, a crash of the process) is a finding.

Used by tests/test_fuzz_parsers.py (a few hundred cases) and bench/fuzz_parsers.py (thousands).
Cases are built from real files (../shared) by byte mutations, interesting integer values written
over header fields, truncations, and structured JSON mutations; the same seed gives the same cases.

    python3 -m tests.fuzzing --target sentencepiece --cases 50 --seed 0   # JSON summary on stdout
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TORCHCHAT_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"

INTERESTING_32 = (0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
INTERESTING_64 = INTERESTING_32 + (1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
JSON_VALUES = (0, -1, 1, 2, 3, 7, 2147483648, 1 << 64, 1.5, -0.0, 1e308, float("inf"), float("nan"), "7", "",
               "x" * 300, None, True, False, [], [1], {}, {"a": 1})


@dataclass
class Result:
    target: str
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "ok" | "error" | "finding"
    findings: list[str] = field(default_factory=list)  # "case N: what happened"
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "cases": self.cases, "outcomes": dict(self.outcomes),
                "findings": self.findings[:20], "seconds": round(self.seconds, 2)}


# --- mutators -------------------------------------------------------------------------------------

def mutate_bytes(rng: random.Random, data: bytes, region: int | None = None) -> bytes:
    """Flips, interesting values over 4/8-byte fields, insertions, deletions or a truncation, mostly
    inside the first `region` bytes (headers) where they matter."""
    d = bytearray(data)
    if not d:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))
    for _ in range(rng.randint(1, 4)):
        if not d:
            break
        limit = min(len(d), region or len(d))
        kind = rng.random()
        at = rng.randrange(limit)
        if kind < 0.35:
            d[at] = rng.randrange(256)
        elif kind < 0.55 and at + 4 <= len(d):
            struct.pack_into("<I", d, at - at % 4, rng.choice(INTERESTING_32))
        elif kind < 0.7 and at + 8 <= len(d):
            struct.pack_into("<Q", d, at - at % 4, rng.choice(INTERESTING_64))
        elif kind < 0.8:
            d[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind < 0.9:
            del d[at : at + rng.randint(1, 16)]
        else:
            del d[rng.randrange(len(d) + 1):]
            break
    return bytes(d)


def mutate_json(rng: random.Random, obj: Any, depth: int = 0) -> Any:
    """Replace, drop or add values anywhere in a JSON document."""
    if isinstance(obj, dict) and obj:
        obj = dict(obj)
        key = rng.choice(list(obj))
        r = rng.random()
        if r < 0.5:
            obj[key] = rng.choice(JSON_VALUES) if depth > 1 or rng.random() < 0.6 else mutate_json(rng, obj[key], depth + 1)
        elif r < 0.7:
            del obj[key]
        elif r < 0.85:
            obj[rng.choice(["extra", "dim", "n_layers", "groupsize", "bitwidth", "dtype", "x" * 40])] = rng.choice(JSON_VALUES)
        else:
            obj[key] = mutate_json(rng, obj[key], depth + 1)
        return obj
    if isinstance(obj, list) and obj:
        obj = list(obj)
        obj[rng.randrange(len(obj))] = rng.choice(JSON_VALUES)
        return obj
    return rng.choice(JSON_VALUES)


def json_text(rng: random.Random, obj: Any) -> str:
    text = json.dumps(obj)
    if rng.random() < 0.1:  # broken syntax too
        text = text[: rng.randrange(len(text) + 1)]
    return text


# --- targets: (make the input, run the parser) ----------------------------------------------------

class Targets:
    """Each target: case(rng, tmp) -> None; raises what the parser raises."""

    def __init__(self):
        self._cache: dict[str, bytes] = {}

    def _read(self, path: Path) -> bytes:
        if str(path) not in self._cache:
            self._cache[str(path)] = path.read_bytes()
        return self._cache[str(path)]

    def gguf_model(self, rng, tmp: Path):
        from torchchat.checkpoint.detect import load_checkpoint
        from torchchat.checkpoint.loaded import LoadOptions

        data = self._read(STORIES / "stories260K.gguf")
        path = tmp / "m.gguf"
        path.write_bytes(mutate_bytes(rng, data, region=12_000))  # metadata, tokenizer and tensor table
        loaded = load_checkpoint(path, LoadOptions(tokenizer=rng.random() < 0.3))
        if loaded.tokenizer is not None:
            loaded.tokenizer.decode(loaded.tokenizer.encode("Once upon a time", bos=True))

    def gguf_vocab(self, rng, tmp: Path):
        from torchchat.tokenizer.load import load_tokenizer

        data = self._read(SHARED / "tokenizers" / "llama.cpp-vocab-tests" / "ggml-vocab-llama-spm.gguf")
        path = tmp / "v.gguf"
        path.write_bytes(mutate_bytes(rng, data, region=len(data)))
        tok = load_tokenizer(path)
        tok.decode(tok.encode("Once upon a time, é 😀", bos=True))

    def llama2c(self, rng, tmp: Path):
        from torchchat.checkpoint.detect import load_checkpoint

        data = self._read(STORIES / "stories260K.bin")
        d = bytearray(data)
        r = rng.random()
        if r < 0.6:  # one header int changed: the case the header walk exists for
            struct.pack_into("<i", d, 4 * rng.randrange(7), rng.choice((0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 63, 64, 65,
                                                                            172, 511, 512, 1 << 20, 0x7FFFFFFF, -(1 << 31))))
            d = bytes(d)
        else:
            d = mutate_bytes(rng, data, region=64)
        path = tmp / "m.bin"
        path.write_bytes(d)
        load_checkpoint(path)

    def params_json(self, rng, tmp: Path):
        from torchchat.model.config import ModelConfig
        from torchchat.model.params_check import check_model_fits

        base = json.loads((ROOT / "torchchat" / "model_params" / rng.choice(
            ["stories15M.json", "Meta-Llama-3.1-8B.json", "Mistral-7B.json", "7B.json"])).read_text())
        for _ in range(rng.randint(1, 3)):
            base = mutate_json(rng, base)
        path = tmp / "params.json"
        path.write_text(json_text(rng, base))
        config = ModelConfig.from_json_file(path)
        check_model_fits(config, 2, "cpu", str(path))

    def hf_config(self, rng, tmp: Path):
        from torchchat.checkpoint.hf import config_from_hf
        from torchchat.model.params_check import check_model_fits

        base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "head_dim": 64,
                "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
        for _ in range(rng.randint(1, 3)):
            base = mutate_json(rng, base)
        text = json_text(rng, base)
        try:
            data = json.loads(text)
        except ValueError:
            return  # config.json's own JSON errors are _read_config's, covered by the hf tests
        config = config_from_hf(data, "config.json")
        check_model_fits(config, 2, "cpu", "config.json")

    def quantize_json(self, rng, tmp: Path):
        from torchchat.quantize import parse_quantize

        recipe = json.loads((ROOT / "torchchat" / "quant_config" / rng.choice(
            ["desktop.json", "mobile.json", "cuda.json", "pi5.json"])).read_text())
        for _ in range(rng.randint(1, 3)):
            recipe = mutate_json(rng, recipe)
        parse_quantize(json_text(rng, recipe) if isinstance(recipe, dict) else json.dumps(recipe))

    def sentencepiece(self, rng, tmp: Path):
        from torchchat.tokenizer.load import load_tokenizer

        path = tmp / "tokenizer.model"
        path.write_bytes(mutate_bytes(rng, self._read(STORIES / "tok512.model")))
        tok = load_tokenizer(path)
        tok.decode(tok.encode("Once upon a time, é 😀 </s>", bos=True, allow_special=True))
        tok.decode(list(range(tok.vocab_size)))

    def tiktoken(self, rng, tmp: Path):
        from torchchat.tokenizer.load import load_tokenizer

        full = self._read(SHARED / "tokenizers" / "llama3" / "tokenizer.model")
        lines = full.split(b"\n", 600)[:600]
        r = rng.random()
        if r < 0.3:
            lines = lines[: rng.randrange(1, len(lines))]
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            choice = rng.random()
            if choice < 0.4:
                lines[i] = mutate_bytes(rng, lines[i])
            elif choice < 0.7:
                lines[i] = lines[i].split(b" ")[0] + b" " + str(rng.choice((0, 5, 599, 600, 10**9, -1))).encode()
            else:
                del lines[i]
        path = tmp / "tokenizer.model"
        path.write_bytes(b"\n".join(lines) + b"\n")
        tok = load_tokenizer(path)
        tok.decode(tok.encode("Once upon a time, é 😀 \x00\xff", bos=True))

    def artifact_metadata(self, rng, tmp: Path):
        from torchchat.export.metadata import ArtifactMetadata, TokenizerInfo
        from torchchat.model.config import ModelConfig

        config = ModelConfig.from_params(json.loads((ROOT / "torchchat" / "model_params" / "stories15M.json").read_text()))
        meta = ArtifactMetadata("stories15M", config, TokenizerInfo("sentencepiece", 1, 2, (2,)), 256, "float32",
                                "aoti", "cpu", True, 1000)
        data = meta.to_dict()
        for _ in range(rng.randint(1, 3)):
            data = mutate_json(rng, data)
        parsed = ArtifactMetadata.from_json(json_text(rng, data), "m.so.json")
        parsed.config.with_max_seq_len(parsed.max_seq_len)

    def aoti_package(self, rng, tmp: Path):
        from torchchat.runtime.aoti_archive import check_package

        buf = tmp / "m.pt2"
        members = {"archive_format": b"pt2", "archive_version": b"0", ".data/version": b"6\n",
                   "data/aotinductor/model/a.wrapper.so": b"\x7fELF" + bytes(200),
                   "data/aotinductor/model/a_metadata.json": b'{"torchchat": "{}"}'}
        if rng.random() < 0.3:
            members[rng.choice(["models/model.json", "data/weights/w", "data/aotinductor/model/x.pt",
                                "data/aotinductor/model/blob", "extra/a", "../x"])] = rng.choice(
                [b"\x80\x02}q\x00.", b"PK\x03\x04", b"{}"])
        with zipfile.ZipFile(buf, "w", rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])) as zf:
            for name, data in members.items():
                zf.writestr("m/" + name, data)
        buf.write_bytes(mutate_bytes(rng, buf.read_bytes()))
        check_package(buf, "--aoti-package-path")

    def pte_header(self, rng, tmp: Path):
        from torchchat.runtime.executorch import check_pte

        head = (60).to_bytes(4, "little") + b"ET12eh00" + (32).to_bytes(4, "little") + (400).to_bytes(8, "little") \
            + (512).to_bytes(8, "little") + (100).to_bytes(8, "little")
        path = tmp / "m.pte"
        path.write_bytes(mutate_bytes(rng, head + bytes(612 - len(head)), region=40))
        check_pte(path, "--pte-path")


# Native parsers that could take the process down with them: run in a child process by the test.
NATIVE = ("sentencepiece", "tiktoken", "gguf_vocab")
ALL = ("gguf_model", "gguf_vocab", "llama2c", "params_json", "hf_config", "quantize_json", "sentencepiece", "tiktoken",
       "artifact_metadata", "aoti_package", "pte_header")


class _CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise _CaseTimeout()


def run(target: str, cases: int, seed: int, time_limit_s: float = 10.0, progress: Callable[[int], None] | None = None) -> Result:
    """Run `cases` cases of `target` in this process. Per-case time limit by SIGALRM (main thread)."""
    from torchchat.errors import TorchchatError

    targets = Targets()
    fn = getattr(targets, target)
    result = Result(target)
    start = time.perf_counter()
    use_alarm = hasattr(signal, "SIGALRM") and __import__("threading").current_thread() is __import__("threading").main_thread()
    old = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    with tempfile.TemporaryDirectory(prefix="tc-fuzz-") as tmp:
        for i in range(cases):
            rng = random.Random(f"{target}:{seed}:{i}")
            if progress:
                progress(i)
            case_dir = Path(tmp) / str(i)
            case_dir.mkdir()
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, time_limit_s)
            try:
                fn(rng, case_dir)
                result.outcomes["ok"] += 1
            except _CaseTimeout:
                result.outcomes["finding"] += 1
                result.findings.append(f"case {i}: ran past {time_limit_s} s")
            except TorchchatError as e:
                if "\n" in str(e) or not str(e).strip():
                    result.outcomes["finding"] += 1
                    result.findings.append(f"case {i}: {type(e).__name__} message is not one line: {str(e)[:200]!r}")
                else:
                    result.outcomes["error"] += 1
            except BaseException as e:  # noqa: BLE001 - a Rust panic (pyo3 PanicException) is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                result.outcomes["finding"] += 1
                result.findings.append(f"case {i}: {type(e).__name__}: {str(e).strip()[:200]}")
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            result.cases += 1
            for p in sorted(case_dir.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            case_dir.rmdir()
    if use_alarm:
        signal.signal(signal.SIGALRM, old)
    result.seconds = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=ALL, required=True)
    p.add_argument("--cases", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds one case may take (a hang)")
    args = p.parse_args(argv)

    def progress(i):  # the last case started, for a process that dies
        print(f"case {i}", file=sys.stderr, flush=True)

    res = run(args.target, args.cases, args.seed, time_limit_s=args.time_limit, progress=progress)
    print(json.dumps(res.as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
