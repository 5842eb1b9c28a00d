"""Seeded, bounded fuzzing of every parser of untrusted input (tests/fuzzing.py): each mutated GGUF
header and tensor table, llama2.c header, params JSON, quantize JSON, tokenizer file, artifact
metadata, .pt2 archive and .pte header ends in valid output or one one-line TorchchatError: never
another exception, a hang or a crash. Pure-Python parsers run in this process; the native ones
(sentencepiece, tiktoken's Rust core, the GGUF vocabulary builder) in a child process, so a crash
fails the test instead of taking pytest down. bench/fuzz_parsers.py runs the same with more cases."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_path
from tests.fuzzing import NATIVE, run

SEED = 0
IN_PROCESS = {"gguf_model": 80, "llama2c": 60, "params_json": 120, "hf_config": 80, "quantize_json": 80, "artifact_metadata": 80,
              "aoti_package": 60, "pte_header": 60}
IN_CHILD = {"sentencepiece": 80, "tiktoken": 80, "gguf_vocab": 5}  # the GGUF vocabulary: 32000 tokens, ~1 s a case


@pytest.fixture(scope="module", autouse=True)
def _shared_data():
    shared_path("models", "stories260K", "stories260K.gguf")


@pytest.mark.parametrize("target", list(IN_PROCESS))
def test_parser_never_tracebacks(target):
    result = run(target, IN_PROCESS[target], SEED, time_limit_s=20)
    assert result.outcomes["finding"] == 0, "\n".join(result.findings)
    assert result.cases == IN_PROCESS[target]


@pytest.mark.parametrize("target", list(IN_CHILD))
def test_native_parser_never_crashes(target):
    assert target in NATIVE
    cases = IN_CHILD[target]
    proc = subprocess.run([sys.executable, "-m", "tests.fuzzing", "--target", target, "--cases", str(cases),
                           "--seed", str(SEED)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = (proc.stderr.strip().splitlines() or ["(no case started)"])[-1]
    assert proc.returncode == 0, f"the process died ({proc.returncode}) at {last}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == cases and not result["findings"], result
