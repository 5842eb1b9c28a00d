"""Exported stories260K (.pt2 through AOT Inductor, .pte through ExecuTorch) scores the storybook tasks
as the eager model does."""
from __future__ import annotations

import importlib.util
import json

import pytest

from torchchat.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
if importlib.util.find_spec("torchchat.export") is None:
    pytest.skip("export not available", allow_module_level=True)

MAX = 128
EVAL = ["--tasks", "storybook_ppl", "storybook_cloze", "--limit", "6", "--max-seq-length", str(MAX)]
METRICS = [("storybook_ppl", "word_perplexity,none"), ("storybook_ppl", "byte_perplexity,none"),
           ("storybook_cloze", "acc,none")]


@pytest.fixture(scope="module")
def files(stories260k_dir):
    return ["--tokenizer-path", str(stories260k_dir / "tok512.model")], stories260k_dir / "stories260K.bin"


def _eval(args: list[str], out) -> dict:
    assert main(["eval", *args, *EVAL, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="module")
def eager(files, tmp_path_factory):
    tok, checkpoint = files
    out = tmp_path_factory.mktemp("eager") / "r.json"
    return _eval(["--checkpoint-path", str(checkpoint), *tok, "--dtype", "fp32"], out)


@pytest.mark.slow
@pytest.mark.parametrize("flag, suffix", [("aoti-package-path", ".pt2"), ("pte-path", ".pte")])
def test_exported_model_gives_the_eager_metrics(files, eager, tmp_path, flag, suffix):
    if suffix == ".pte":
        pytest.importorskip("executorch", reason="ExecuTorch is not installed")
    tok, checkpoint = files
    artifact = tmp_path / f"stories260K{suffix}"
    assert main(["export", "--checkpoint-path", str(checkpoint), *tok, "--dtype", "fp32",
                 "--max-seq-length", str(MAX), f"--output-{flag}", str(artifact)]) == 0
    exported = _eval([f"--{flag}", str(artifact), *tok], tmp_path / "r.json")
    for task, metric in METRICS:
        assert exported[task][metric] == pytest.approx(eager[task][metric], rel=1e-4), (task, metric)
