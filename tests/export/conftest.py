"""Shared by the export tests: the artifacts, exported once per session by `torchchat.py export` run as a
user runs it, and helpers to run `generate` in-process and compare exported logits with eager ones.

Each export is tens of seconds (AOT Inductor) to minutes (ExecuTorch) of single-threaded compiling, so
they all start together in the background when a test first asks for one, two at a time (the machine
has two cores), and a test waits only for the artifacts it uses."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from torchchat.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
MAX_SEQ_LEN = 256  # BOS or PROMPT + 200 new tokens fit

Q_INT8 = '{"linear:int8": {"bitwidth": 8, "groupsize": 0}, "embedding": {"bitwidth": 8, "groupsize": 0}}'
Q_INT4 = '{"linear:int4": {"groupsize": 32}, "embedding": {"bitwidth": 4, "groupsize": 32}}'
Q_INT8_G32 = '{"linear:int8": {"bitwidth": 8, "groupsize": 32}}'
Q_MOBILE = '{"linear:a8w4dq": {"groupsize": 32}, "embedding": {"bitwidth": 8, "groupsize": 0}}'


@dataclass(frozen=True)
class Artifact:
    """One export of stories260K: its output flag and file name, and the build flags."""

    flag: str  # the export flag: --output-aoti-package-path | --output-dso-path | --output-pte-path
    file: str
    dtype: str = "fp32"
    quantize: str | None = None
    dynamic: bool = True

    @property
    def run_flag(self) -> str:
        """The flag that runs it: --aoti-package-path | --dso-path | --pte-path."""
        return self.flag.replace("--output-", "--")

    @property
    def cpu_kernels(self) -> bool:
        """Whether the export runs torchchat's native CPU kernels: only .pt2 packages can call them
        (torchchat/cli/export.py); .so and .pte exports take torchao's path."""
        return self.flag == "--output-aoti-package-path"

    @property
    def needs_executorch(self) -> bool:
        return self.file.endswith(".pte")

    def build_args(self) -> list[str]:
        args = ["--dtype", self.dtype]
        if self.quantize:
            args += ["--quantize", self.quantize]
        return args


ARTIFACTS = {
    "pt2": Artifact("--output-aoti-package-path", "fp32.pt2"),
    "so_int8": Artifact("--output-dso-path", "fp32_int8.so", quantize=Q_INT8, dynamic=False),
    "pt2_bf16_int4": Artifact("--output-aoti-package-path", "bf16_int4.pt2", dtype="bf16", quantize=Q_INT4),
    "pt2_bf16_int8": Artifact("--output-aoti-package-path", "bf16_int8.pt2", dtype="bf16", quantize=Q_INT8_G32),
    "pte": Artifact("--output-pte-path", "fp32.pte"),
    "pte_mobile": Artifact("--output-pte-path", "fp32_mobile.pte", quantize=Q_MOBILE),
}
# AOT Inductor first in each lane: those tests come first and can run while ExecuTorch lowers.
LANES = (("pt2", "so_int8", "pte"), ("pt2_bf16_int4", "pt2_bf16_int8", "pte_mobile"))


@dataclass
class _Job:
    done: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = None
    log: str = ""


class Exports:
    """Background exports of ARTIFACTS into `folder`, one lane per thread; `path(name)` waits for one."""

    def __init__(self, folder: Path, source_args: list[str]):
        self.folder = folder
        self.source_args = source_args
        self.jobs = {name: _Job() for name in ARTIFACTS}
        self.stopped = False
        self.has_executorch = importlib.util.find_spec("executorch") is not None
        self.threads = [threading.Thread(target=self._lane, args=(lane,), daemon=True) for lane in LANES]
        for t in self.threads:
            t.start()

    def _lane(self, names) -> None:
        for name in names:
            job, art = self.jobs[name], ARTIFACTS[name]
            if not self.stopped and not (art.needs_executorch and not self.has_executorch):
                cmd = [sys.executable, str(ROOT / "torchchat.py"), "export", *self.source_args, *art.build_args(),
                       art.flag, str(self.folder / art.file), "--max-seq-length", str(MAX_SEQ_LEN)]
                if not art.dynamic:
                    cmd.append("--no-dynamic-shapes")
                job.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
                job.log = job.proc.communicate()[0]
            job.done.set()

    def path(self, name: str) -> Path:
        art, job = ARTIFACTS[name], self.jobs[name]
        if art.needs_executorch and not self.has_executorch:
            pytest.skip("executorch is not installed (the export extra)")
        job.done.wait()
        if job.proc is None or job.proc.returncode != 0:
            pytest.fail(f"export of {name} failed:\n{job.log[-3000:]}")
        return self.folder / art.file

    def stop(self) -> None:
        self.stopped = True
        for job in self.jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
        for t in self.threads:
            t.join()


@pytest.fixture(scope="session")
def stories_args(stories260k_dir) -> list[str]:
    return ["--checkpoint-path", str(stories260k_dir / "stories260K.bin"),
            "--tokenizer-path", str(stories260k_dir / "tok512.model")]


@pytest.fixture(scope="session")
def exports(stories_args, tmp_path_factory):
    queue = Exports(tmp_path_factory.mktemp("exports"), stories_args)
    yield queue
    queue.stop()


@pytest.fixture(scope="session")
def tok_args(stories260k_dir) -> list[str]:
    return ["--tokenizer-path", str(stories260k_dir / "tok512.model")]


@pytest.fixture(scope="session")
def golden(stories260k_dir) -> bytes:
    """llama2.c's own output for stories260K: BOS, then 200 greedy steps, decoded."""
    return (stories260k_dir / "expected_greedy_200.txt").read_bytes()


def generate(capsys, args: list[str], prompt: str = "", n: int = 200) -> tuple[str, str]:
    """Greedy `generate` in-process; returns (stdout, stderr)."""
    capsys.readouterr()
    code = main(["generate", *map(str, args), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def error_line(capsys, args: list[str], command: str = "generate") -> str:
    """Run a command that must fail; returns its one error line (ExecuTorch's own "[file.cpp:N]" log
    lines, written by its C++ runtime, are not ours and are left out)."""
    capsys.readouterr()
    code = main([command, *map(str, args), "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def run_exported(path: Path, run_flag: str, stories260k_dir):
    """The runtime `generate` would use for an artifact, set up for MAX_SEQ_LEN positions."""
    from torchchat.build import BuildSpec, ModelSource, build_model

    key = run_flag.lstrip("-").replace("-", "_")
    source = ModelSource(tokenizer_path=stories260k_dir / "tok512.model", **{key: path})
    built = build_model(BuildSpec(source=source, dtype=None))
    built.runtime.setup(1, MAX_SEQ_LEN)
    return built


def eager_model(stories260k_dir, quantize: str | None = None, dtype: str = "fp32", cpu_kernels: bool = True):
    """stories260K built as `generate` builds it, with a KV cache of MAX_SEQ_LEN positions; `cpu_kernels`
    False takes torchao's quantized path instead of torchchat's native kernels (as .so/.pte exports do)."""
    from torchchat.build import BuildSpec, ModelSource, build_model, resolve_dtype

    plan = None
    if quantize is not None:
        from torchchat.quantize import parse_quantize

        plan = parse_quantize(quantize)
    source = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin",
                         tokenizer_path=stories260k_dir / "tok512.model")
    built = build_model(BuildSpec(source=source, dtype=resolve_dtype(dtype, "cpu"), quant=plan, max_seq_len=MAX_SEQ_LEN,
                                  cpu_kernels=cpu_kernels))
    built.runtime.setup(1, MAX_SEQ_LEN)
    return built


def logits_along(forward, ids: list[int], n_prefill: int, parallel: bool = True) -> torch.Tensor:
    """Logits (1, len(ids), V) float32 as generation computes them: the first n_prefill ids in one
    call (or one call each), then one call per id."""
    tokens = torch.tensor([ids])
    out = []
    with torch.no_grad():
        if parallel:
            out.append(forward(tokens[:, :n_prefill], torch.arange(n_prefill)))
        else:
            out += [forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(n_prefill)]
        out += [forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(n_prefill, len(ids))]
    return torch.cat(out, dim=1).float()


def golden_ids(built, golden: bytes) -> list[int]:
    """BOS and the tokens of llama2.c's greedy text, 200 in all: a real story to feed both models."""
    return built.tokenizer.encode(golden.decode(), bos=True)[:200]


def compare_along(exported, eager, ids: list[int], n_prefill: int = 20) -> dict[str, float]:
    """Teacher forcing: feed `ids` to the exported model as generation does (a prefill of n_prefill, or
    one token at a time without dynamic shapes, then one call per token) and to eager in one parallel
    call (cached decode equals the full forward: tests/model). Returns the largest logit difference, the
    share of steps whose argmax agrees, and the logits' largest magnitude."""
    parallel = exported.runtime.supports_parallel_prefill
    got = logits_along(exported.runtime.forward, ids, n_prefill, parallel)
    with torch.no_grad():
        want = eager.runtime.forward(torch.tensor([ids]), torch.arange(len(ids))).float()
    assert got.shape == want.shape == (1, len(ids), 512)
    return {
        "max_abs_diff": (got - want).abs().max().item(),
        "argmax_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "logit_range": want.abs().max().item(),
    }
