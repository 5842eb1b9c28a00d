"""Fixtures for the C++ runner tests: the binaries (built once per session with install/build_runner.sh)
and stories260K exported to each artifact form the runners read."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner_process import BUILD_DIR, ROOT


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
    import torch

    import runner_artifacts as ra

    out = tmp_path_factory.mktemp("stories260K_exports")
    model = ra.load_llama2c_model(stories260k_dir / "stories260K.bin")
    max_seq_len = model.config.max_seq_len
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # exporting is compile-bound; leave the other core to the rest of the suite
    try:
        pt2 = ra.export_pt2(model, out / "model.pt2", ra.metadata("stories260K", model.config, max_seq_len, dynamic=True))
        so = ra.export_so(model, out / "model.so", ra.metadata("stories260K", model.config, max_seq_len, dynamic=False))
        pte = ra.export_pte(model, out / "model.pte", ra.metadata("stories260K", model.config, max_seq_len, dynamic=True))
    finally:
        torch.set_num_threads(threads)
    return Artifacts(pt2=pt2, so=so, pte=pte, tokenizer=stories260k_dir / "tok512.model")

