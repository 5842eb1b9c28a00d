"""AOT Inductor export of stories260K, run back through `generate`: a .pt2 with dynamic shapes (parallel
prefill) and a .so without (one token per call), against llama2.c's golden output and eager logits."""
import json
import shutil

import pytest
import torch

from tests.export.conftest import eager_model, error_line, export, generate, prefill_then_decode

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


@pytest.fixture(scope="module")
def pt2(stories_args, tmp_path_factory):
    path = tmp_path_factory.mktemp("aoti") / "stories260K.pt2"
    export([*stories_args, "--output-aoti-package-path", path, "--max-seq-length", "256"])
    return path


@pytest.fixture(scope="module")
def so(stories_args, tmp_path_factory):
    path = tmp_path_factory.mktemp("dso") / "stories260K.so"
    export([*stories_args, "--output-dso-path", path, "--max-seq-length", "256", "--no-dynamic-shapes"])
    return path


def test_pt2_greedy_200_is_llama2c_output(pt2, tok_args, golden, capsys):
    out, err = generate(capsys, ["--aoti-package-path", pt2, *tok_args])
    assert out.encode() == golden + b"\n"
    assert "Bandwidth achieved" in err


def test_pt2_prefills_in_parallel_and_matches_eager(pt2, tok_args, stories_args, capsys):
    exported, err = generate(capsys, ["--aoti-package-path", pt2, *tok_args], PROMPT, n=100)
    assert "with parallel prefill" in err
    eager, _ = generate(capsys, [*stories_args, "--dtype", "fp32"], PROMPT, n=100)
    assert exported == eager


def test_pt2_logits_match_eager(pt2, stories260k_dir):
    from torchchat.runtime.aoti import AOTIRuntime

    runtime = AOTIRuntime.load_package(pt2)
    runtime.setup(1, 256)
    eager = eager_model(stories260k_dir)
    ids = eager.tokenizer.encode(PROMPT * 3, bos=True)
    want = prefill_then_decode(eager.runtime.forward, ids, 20)
    got = prefill_then_decode(runtime.forward, ids, 20)
    assert got.shape == want.shape == (1, len(ids), 512)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pt2_metadata_describes_the_model(pt2, stories260k_dir):
    from torchchat.generation.metrics import bytes_read_per_token
    from torchchat.runtime.aoti import AOTIRuntime

    meta = AOTIRuntime.load_package(pt2).meta
    eager = eager_model(stories260k_dir)
    assert meta.config == eager.config and meta.config.tie_embeddings  # llama2.c's shared classifier
    assert (meta.max_seq_len, meta.dtype, meta.dynamic_shapes, meta.quantize) == (256, "float32", True, None)
    assert (meta.tokenizer.kind, meta.tokenizer.bos_id, meta.tokenizer.eos_id) == ("sentencepiece", 1, 2)
    assert meta.weight_bytes == bytes_read_per_token(eager.model)


def test_so_runs_one_token_at_a_time_and_matches_eager(so, tok_args, stories_args, capsys):
    out, err = generate(capsys, ["--dso-path", so, *tok_args], PROMPT, n=100)
    assert "with sequential prefill" in err
    eager, _ = generate(capsys, [*stories_args, "--dtype", "fp32"], PROMPT, n=100)
    assert out == eager
    sidecar = json.loads(so.with_name(so.name + ".json").read_text())
    assert sidecar["dynamic_shapes"] is False and sidecar["artifact_bytes"] == so.stat().st_size


def test_so_rejects_many_tokens_per_call(so):
    from torchchat.errors import ExportError
    from torchchat.runtime.aoti import AOTIRuntime

    runtime = AOTIRuntime.load_shared_library(so)
    assert runtime.supports_parallel_prefill is False
    with pytest.raises(ExportError, match="one token per call"):
        runtime.forward(torch.tensor([[1, 2]]), torch.arange(2))


def test_wrong_model_tokenizer_or_damaged_file_is_a_clear_error(pt2, so, tok_args, stories260k_dir, tmp_path, capsys):
    line = error_line(capsys, ["stories15M", "--aoti-package-path", pt2, *tok_args])
    assert "architecture differs from model 'stories15M'" in line
    llama2_tok = stories260k_dir.parent.parent / "tokenizers" / "llama2" / "tokenizer.model"
    line = error_line(capsys, ["--aoti-package-path", pt2, "--tokenizer-path", llama2_tok])
    assert "32000" in line and "512" in line
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(pt2.read_bytes()[: pt2.stat().st_size // 2])
    assert "damaged or truncated" in error_line(capsys, ["--aoti-package-path", cut, *tok_args])
    line = error_line(capsys, ["--pte-path", pt2, *tok_args])
    assert "not an ExecuTorch program" in line
    other = tmp_path / "other.so"
    shutil.copy(so, other)
    shutil.copy(pt2, tmp_path / "other.so.json")  # a sidecar that is not JSON
    assert "not valid JSON" in error_line(capsys, ["--dso-path", other, *tok_args])
    side = json.loads(so.with_name(so.name + ".json").read_text())
    side["artifact_bytes"] += 1
    (tmp_path / "other.so.json").write_text(json.dumps(side))
    assert "describes a different library" in error_line(capsys, ["--dso-path", other, *tok_args])


def test_context_beyond_the_export_is_refused(pt2, tok_args, capsys):
    line = error_line(capsys, ["--aoti-package-path", pt2, *tok_args, "--prompt", "the cat sat " * 100])
    assert "context holds 256" in line
