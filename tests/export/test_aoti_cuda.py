"""CUDA AOT Inductor round trip (issue 18): stories260K exported with `--device cuda` to a .pt2 package,
loaded back by `generate` as a user runs it (a fresh process, so the libstdc++ restart of
torchchat/runtime/cxx_runtime.py happens as it would for them), and its greedy text compared with the
eager CUDA model's. Skipped without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

from tests.export.conftest import PROMPT, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _torchchat(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "torchchat.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def test_cuda_pt2_generates_the_eager_greedy_text(stories260k_dir, tmp_path):
    model = ["--checkpoint-path", str(stories260k_dir / "stories260K.bin")]
    tok = ["--tokenizer-path", str(stories260k_dir / "tok512.model")]
    pt2 = tmp_path / "s260k_cuda.pt2"
    done = _torchchat("export", *model, *tok, "--device", "cuda", "--output-aoti-package-path", str(pt2), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = ["--device", "cuda", "--prompt", PROMPT, "--max-new-tokens", "100", "--temperature", "0"]
    exported = _torchchat("generate", "--aoti-package-path", str(pt2), *tok, *run)
    assert exported.returncode == 0, f"exit {exported.returncode}: {exported.stderr[-2000:]}"
    eager = _torchchat("generate", *model, *tok, *run)
    assert eager.returncode == 0, eager.stderr[-2000:]
    # fp32 in both; a near-tie could part them late, so the first 60 characters past the prompt must agree
    # and the texts must share most of their length.
    a, b = exported.stdout.strip(), eager.stdout.strip()
    assert a.startswith(PROMPT) and b.startswith(PROMPT)
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common >= len(PROMPT) + 60, f"exported and eager part at character {common}:\n{a}\n---\n{b}"
    # The decode steps above replayed a CUDA graph of the package call; launched call by call
    # (TORCHCHAT_AOTI_GRAPH=0) the same kernels give the same text.
    launched = _torchchat("generate", "--aoti-package-path", str(pt2), *tok, *run, env={"TORCHCHAT_AOTI_GRAPH": "0"})
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.strip() == a
    # A second prompt in the same process calls the package again after its decode step was captured
    # (a multi-threaded container failed exactly there): both samples give the same text.
    twice = _torchchat("generate", "--aoti-package-path", str(pt2), *tok, *run, "--num-samples", "2")
    assert twice.returncode == 0, twice.stderr[-2000:]
    assert twice.stdout.count(a[len(PROMPT):len(PROMPT) + 60]) == 2, twice.stdout
