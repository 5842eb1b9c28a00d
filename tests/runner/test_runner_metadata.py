"""The runners on a model exported from a GGUF file (tokenizer kind "gguf": export writes the vocabulary
as <model>.tokenizer.model), and command-line flags winning over a .so's sidecar metadata."""
from __future__ import annotations

import json
import shutil

import pytest

from runner_process import MAX_SEQ_LEN, run_binary
from tests.conftest import shared_path

pytestmark = pytest.mark.slow  # builds the runners and exports stories260K

GOLDEN = ("models", "stories260K", "expected_greedy_200.txt")


def test_model_exported_from_gguf_runs_with_the_tokenizer_export_wrote(runner_bins, gguf_artifact):
    assert gguf_artifact.tokenizer.is_file()
    res = run_binary(runner_bins / "aoti_run", gguf_artifact.pt2, "-z", gguf_artifact.tokenizer, "-n", "200", "-t", "0")
    assert res.returncode == 0, res.stderr
    # stories260K.gguf holds the .bin's weights bit for bit: llama2.c's own greedy output.
    assert res.stdout == shared_path(*GOLDEN).read_text() + "\n"


def test_the_gguf_itself_as_tokenizer_names_the_file_to_pass(runner_bins, gguf_artifact):
    res = run_binary(runner_bins / "aoti_run", gguf_artifact.pt2, "-z", gguf_artifact.gguf)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ".tokenizer.model" in lines[0], res.stderr


def test_gguf_vocabulary_file_encodes_llama_cpp_vectors(runner_bins, tmp_path):
    """The file export writes for a GGUF SentencePiece vocabulary, read by the runners' tokenizer as kind
    "gguf", gives llama.cpp's ids for its 46 test strings (the Llama 2 vocabulary-only GGUF)."""
    from tests.runner.test_tokenizers import read_vectors
    from torchchat.export.runner_tokenizer import write_runner_tokenizer
    from torchchat.tokenizer.gguf import tokenizer_from_gguf

    tok = tokenizer_from_gguf(shared_path("tokenizers", "llama.cpp-vocab-tests", "ggml-vocab-llama-spm.gguf"))
    (written,) = write_runner_tokenizer(tok, [tmp_path / "llama2.pte"])
    assert written == tmp_path / "llama2.tokenizer.model"
    vectors = read_vectors("ggml-vocab-llama-spm")
    stdin = "".join(json.dumps(text) + "\n" for text, _ in vectors)
    res = run_binary(runner_bins / "tokenizer_test", "gguf", written, "encode", stdin=stdin)
    assert res.returncode == 0, res.stderr
    got = [[int(t) for t in line.split()] for line in res.stdout.split("\n")[: len(vectors)]]
    assert got == [ids for _, ids in vectors]


def test_kind_flag_wins_over_the_sidecar(runner_bins, stories_artifacts, tmp_path):
    """A .so whose sidecar names the wrong tokenizer kind: -l corrects it (it used to be ignored)."""
    so = tmp_path / "model.so"
    shutil.copy(stories_artifacts.so, so)
    meta = json.loads((stories_artifacts.so.parent / "model.so.json").read_text())
    meta["tokenizer"]["kind"] = "tiktoken"
    (tmp_path / "model.so.json").write_text(json.dumps(meta))
    wrong = run_binary(runner_bins / "aoti_run", so, "-z", stories_artifacts.tokenizer, "-n", "5", "-t", "0")
    assert wrong.returncode == 2 and "tiktoken" in wrong.stderr
    res = run_binary(runner_bins / "aoti_run", so, "-z", stories_artifacts.tokenizer, "-l", "sentencepiece",
                     "-n", "200", "-t", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == shared_path(*GOLDEN).read_text() + "\n"


def test_context_flag_may_lower_but_not_raise_the_exported_length(runner_bins, stories_artifacts):
    args = ("-z", stories_artifacts.tokenizer, "-t", "0", "-n", "0")
    res = run_binary(runner_bins / "aoti_run", stories_artifacts.so, *args, "-c", "40")
    assert res.returncode == 0, res.stderr
    assert "prompt tokens: 1, generated tokens: 39," in res.stderr  # the context ends at 40 positions
    res = run_binary(runner_bins / "aoti_run", stories_artifacts.so, *args, "-c", str(MAX_SEQ_LEN + 1))
    assert res.returncode == 2 and f"exported with {MAX_SEQ_LEN} positions" in res.stderr



def test_a_so_exported_for_cuda_is_refused_with_what_to_export(runner_bins, stories_artifacts, tmp_path):
    """A bare .so loads only on the CPU (AOTIModelContainerRunnerCpu): one whose sidecar says CUDA gets one
    line naming the .pt2 export instead of a crash inside the loader."""
    so = tmp_path / "model.so"
    shutil.copy(stories_artifacts.so, so)
    meta = json.loads((stories_artifacts.so.parent / "model.so.json").read_text())
    meta["device"] = "cuda"
    (tmp_path / "model.so.json").write_text(json.dumps(meta))
    res = run_binary(runner_bins / "aoti_run", so, "-z", stories_artifacts.tokenizer, "-n", "5", "-t", "0")
    assert res.returncode == 2 and "exported for cuda" in res.stderr and "--output-aoti-package-path" in res.stderr
