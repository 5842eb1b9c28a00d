"""What every exported form must do, for the .pt2 (AOT Inductor, dynamic shapes) and the .pte
(ExecuTorch, XNNPACK) of stories260K: llama2.c's golden output, parallel prefill giving eager's text,
and eager's logits along a prompt."""
import pytest
import torch

from tests.export.conftest import PROMPT, eager_model, generate, logits_along, run_exported

pytestmark = pytest.mark.slow

FORMS = [("pt2", "--aoti-package-path"), ("pte", "--pte-path")]


@pytest.mark.parametrize("name, flag", FORMS)
def test_greedy_200_is_llama2c_output(name, flag, exports, tok_args, golden, capsys):
    out, err = generate(capsys, [flag, exports.path(name), *tok_args])
    assert out.encode() == golden + b"\n"
    assert "Bandwidth achieved" in err


@pytest.mark.parametrize("name, flag", FORMS)
def test_prefills_in_parallel_and_matches_eager(name, flag, exports, tok_args, stories_args, capsys):
    exported, err = generate(capsys, [flag, exports.path(name), *tok_args], PROMPT)
    assert "with parallel prefill" in err
    eager, _ = generate(capsys, [*stories_args, "--dtype", "fp32"], PROMPT)
    assert exported == eager


@pytest.mark.parametrize("name, flag", FORMS)
def test_logits_match_eager(name, flag, exports, stories260k_dir):
    runtime = run_exported(exports.path(name), flag, stories260k_dir).runtime
    eager = eager_model(stories260k_dir)
    ids = eager.tokenizer.encode(PROMPT * 3, bos=True)
    want = logits_along(eager.runtime.forward, ids, 20)
    got = logits_along(runtime.forward, ids, 20)
    assert got.shape == want.shape == (1, len(ids), 512)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, flag", FORMS)
def test_a_max_seq_length_above_the_artifacts_is_capped_with_one_note(name, flag, exports, tok_args, capsys):
    path = exports.path(name)
    _, err = generate(capsys, [flag, path, *tok_args, "--max-seq-length", "9999"], n=5)
    assert err.count(f"--max-seq-length 9999 is more than the positions {path.name} was exported with (256): "
                     "using 256") == 1
