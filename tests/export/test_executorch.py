"""ExecuTorch export of stories260K (XNNPACK delegate), run back through `generate` with the .pte:
llama2.c's golden output, eager logits, and clear errors for what is not a torchchat .pte."""
import pytest
import torch

from tests.export.conftest import eager_model, error_line, export, generate, prefill_then_decode

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


@pytest.fixture(scope="module")
def pte(stories_args, tmp_path_factory):
    pytest.importorskip("executorch", reason="the export extra is not installed")
    path = tmp_path_factory.mktemp("et") / "stories260K.pte"
    export([*stories_args, "--output-pte-path", path, "--max-seq-length", "256"])
    return path


def test_pte_greedy_200_is_llama2c_output(pte, tok_args, golden, capsys):
    out, err = generate(capsys, ["--pte-path", pte, *tok_args])
    assert out.encode() == golden + b"\n"
    assert "Bandwidth achieved" in err


def test_pte_prefills_in_parallel_and_matches_eager(pte, tok_args, stories_args, capsys):
    exported, err = generate(capsys, ["--pte-path", pte, *tok_args], PROMPT, n=100)
    assert "with parallel prefill" in err
    eager, _ = generate(capsys, [*stories_args, "--dtype", "fp32"], PROMPT, n=100)
    assert exported == eager


def test_pte_logits_match_eager(pte, stories260k_dir):
    from torchchat.runtime.executorch import ExecuTorchRuntime

    runtime = ExecuTorchRuntime.load(pte)
    runtime.setup(1, 256)
    eager = eager_model(stories260k_dir)
    ids = eager.tokenizer.encode(PROMPT * 3, bos=True)
    want = prefill_then_decode(eager.runtime.forward, ids, 20)
    got = prefill_then_decode(runtime.forward, ids, 20)
    assert got.shape == want.shape == (1, len(ids), 512)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pte_constant_methods_for_runners(pte):
    from torchchat.export.metadata import ArtifactMetadata
    from torchchat.runtime.executorch import import_bindings

    module = import_bindings()._load_for_executorch(str(pte))
    assert module.run_method("get_max_seq_len", ())[0] == 256
    assert module.run_method("get_vocab_size", ())[0] == 512
    raw = module.run_method("torchchat_metadata", ())[0]
    assert raw.dtype == torch.uint8 and raw.dim() == 1
    meta = ArtifactMetadata.from_json(raw.numpy().tobytes(), str(pte))
    assert (meta.backend, meta.dtype, meta.max_seq_len, meta.dynamic_shapes) == ("executorch", "float32", 256, True)


def test_wrong_model_tokenizer_or_damaged_file_is_a_clear_error(pte, tok_args, stories260k_dir, tmp_path, capsys):
    line = error_line(capsys, ["stories15M", "--pte-path", pte, *tok_args])
    assert "architecture differs from model 'stories15M'" in line
    llama2_tok = stories260k_dir.parent.parent / "tokenizers" / "llama2" / "tokenizer.model"
    line = error_line(capsys, ["--pte-path", pte, "--tokenizer-path", llama2_tok])
    assert "32000" in line and "512" in line
    cut = tmp_path / "cut.pte"
    cut.write_bytes(pte.read_bytes()[: pte.stat().st_size // 2])
    assert "damaged or truncated" in error_line(capsys, ["--pte-path", cut, *tok_args])
    assert "not an AOT Inductor package" in error_line(capsys, ["--aoti-package-path", pte, *tok_args])
