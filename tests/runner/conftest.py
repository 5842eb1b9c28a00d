"""Fixtures for the C++ runner tests: the binaries (built once per session with install/build_runner.sh)
and stories260K exported by `torchchat.py export` to each artifact form the runners read."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner_process import BUILD_DIR, MAX_SEQ_LEN, ROOT, export


@dataclass(frozen=True)
class Artifacts:
    pt2: Path  # dynamic shapes: parallel prefill
    so: Path  # static S == 1, metadata in model.so.json beside it
    pte: Path  # dynamic shapes
    tokenizer: Path


@pytest.fixture(scope="session")
def runner_bins() -> Path:
    """cmake-out/ with aoti_run, et_run and tokenizer_test, (re)built by the documented command."""
    proc = subprocess.run([str(ROOT / "install" / "build_runner.sh"), "all"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"install/build_runner.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return BUILD_DIR


@pytest.fixture(scope="session")
def stories_artifacts(tmp_path_factory, stories260k_dir) -> Artifacts:
    out = tmp_path_factory.mktemp("stories260K_exports")
    source = ["--checkpoint-path", stories260k_dir / "stories260K.bin", "--tokenizer-path",
              stories260k_dir / "tok512.model", "--dtype", "fp32", "--max-seq-length", str(MAX_SEQ_LEN)]
    export(*source, "--output-aoti-package-path", out / "model.pt2", "--output-pte-path", out / "model.pte")
    export(*source, "--output-dso-path", out / "model.so", "--no-dynamic-shapes")
    return Artifacts(pt2=out / "model.pt2", so=out / "model.so", pte=out / "model.pte",
                     tokenizer=stories260k_dir / "tok512.model")


@dataclass(frozen=True)
class GgufArtifact:
    pt2: Path  # exported from stories260K.gguf
    tokenizer: Path  # the model.tokenizer.model export wrote beside it
    gguf: Path


@pytest.fixture(scope="session")
def gguf_artifact(tmp_path_factory, stories260k_dir) -> GgufArtifact:
    """stories260K exported from its GGUF file (tokenizer kind "gguf"), as a .pt2."""
    out = tmp_path_factory.mktemp("stories260K_gguf_export")
    gguf = stories260k_dir / "stories260K.gguf"
    export("--gguf-path", gguf, "--dtype", "fp32", "--max-seq-length", str(MAX_SEQ_LEN),
           "--output-aoti-package-path", out / "model.pt2")
    return GgufArtifact(pt2=out / "model.pt2", tokenizer=out / "model.tokenizer.model", gguf=gguf)
