"""`generate` through the CLI, as a user runs it: llama2.c's golden output, seeds, metrics, bad input."""
import json

import pytest

from tests.cli.helpers import run_cli


@pytest.fixture(scope="module")
def stories(stories260k_dir):
    return ["--checkpoint-path", stories260k_dir / "stories260K.bin", "--tokenizer-path", stories260k_dir / "tok512.model",
            "--dtype", "fp32", "--device", "cpu"]


def test_greedy_200_matches_llama2c_byte_for_byte(stories, stories260k_dir, tmp_path):
    metrics = tmp_path / "m.json"
    r = run_cli("generate", *stories, "--prompt", "", "--temperature", "0", "--max-new-tokens", "200",
                "--metrics-json", metrics)
    assert r.returncode == 0, r.stderr
    expected = (stories260k_dir / "expected_greedy_200.txt").read_bytes()
    assert r.stdout.encode() == expected + b"\n"
    m = json.loads(metrics.read_text())
    assert m["samples"][0]["generated_tokens"] == 200
    assert m["samples"][0]["prompt_tokens"] == 1  # BOS alone
    assert m["model_bytes_per_token"] > 0 and m["median"]["next_tokens_per_s"] > 0
    assert "Time to first token" in r.stderr and "Bandwidth achieved" in r.stderr


def test_seed_reproduces_sampled_text(stories):
    args = ["generate", *stories, "--prompt", "Once upon a time", "--temperature", "1.0", "--top-p", "0.9",
            "--max-new-tokens", "40"]
    a = run_cli(*args, "--seed", "42")
    b = run_cli(*args, "--seed", "42")
    c = run_cli(*args, "--seed", "43")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout
    assert a.stdout.startswith("Once upon a time")


def test_num_samples_reports_each(stories):
    r = run_cli("generate", *stories, "--prompt", "Hi", "--max-new-tokens", "5", "--num-samples", "2")
    assert r.returncode == 0, r.stderr
    assert "Time for inference 1" in r.stderr and "Time for inference 2" in r.stderr
    assert "Average tokens/sec" in r.stderr


def test_sampled_num_samples_run_as_a_batch_equal_serial_runs_with_their_seeds(stories):
    """Sampled --num-samples run as one batch; sample i is what `--seed S+i` alone gives (fp32), and
    --serial-samples gives the same texts one after another."""
    args = ["generate", *stories, "--prompt", "Once upon a time", "--temperature", "1.0", "--top-k", "50",
            "--max-new-tokens", "30"]
    batch = run_cli(*args, "--num-samples", "3", "--seed", "20")
    assert batch.returncode == 0, batch.stderr
    assert "Batch of 3 samples" in batch.stderr and "Time for inference 3" in batch.stderr
    singles = [run_cli(*args, "--seed", str(20 + i)) for i in range(3)]
    assert all(r.returncode == 0 for r in singles)
    assert batch.stdout == "".join(r.stdout for r in singles)
    assert len(set(batch.stdout.splitlines())) > 1
    serial = run_cli(*args, "--num-samples", "3", "--seed", "20", "--serial-samples")
    assert serial.returncode == 0 and "Batch of" not in serial.stderr
    assert serial.stdout == batch.stdout


def _bad_inputs(d, tmp):
    bad_json = tmp / "bad.json"
    bad_json.write_text("{\"dim\": 64,")
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"\x00\x01" * 500)
    cut = tmp / "cut.bin"
    cut.write_bytes((d / "stories260K.bin").read_bytes()[:400_000])
    ck, tok = d / "stories260K.bin", d / "tok512.model"
    llama2_tok = d.parent.parent / "tokenizers" / "llama2" / "tokenizer.model"
    return {
        "unknown model": (["llama3.3"], r"unknown model 'llama3.3'\. Did you mean: .*llama3"),
        "missing checkpoint": (["--checkpoint-path", tmp / "nope.pth"], r"nope.pth does not exist"),
        "unreadable checkpoint": (["--checkpoint-path", garbage, "--tokenizer-path", tok], r"unrecognised checkpoint format"),
        "params do not fit": (["--checkpoint-path", ck, "--tokenizer-path", tok, "--params-table", "stories15M"],
                              r"tensor '.*' has shape .* but the model expects"),
        "tokenizer vocab": (["--checkpoint-path", ck, "--tokenizer-path", llama2_tok], r"32000.*512|512.*32000"),
        "truncated bin": (["--checkpoint-path", cut, "--tokenizer-path", tok], r"truncated"),
        "malformed params json": (["--params-path", bad_json, "--dummy-weights", "--tokenizer-path", tok], r"not valid JSON"),
        "prompt too long": (["--checkpoint-path", ck, "--tokenizer-path", tok, "--prompt", "the cat sat " * 300],
                            r"context holds 512"),
        "no cuda": (["--checkpoint-path", ck, "--tokenizer-path", tok, "--device", "cuda"], r"CUDA is not available"),
        "unknown params table": (["--params-table", "stories16M", "--dummy-weights", "--tokenizer-path", tok],
                                 r"unknown params table 'stories16M'.*stories15M"),
    }


@pytest.mark.parametrize("case", ["unknown model", "missing checkpoint", "unreadable checkpoint", "params do not fit",
                                  "tokenizer vocab", "truncated bin", "malformed params json", "prompt too long",
                                  "no cuda", "unknown params table"])
def test_bad_input_gets_one_clear_line(case, stories260k_dir, tmp_path, capsys):
    """In-process through cli.main (the same path as the script, minus interpreter start-up)."""
    import re

    import torch

    from torchchat.cli import main

    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, pattern = _bad_inputs(stories260k_dir, tmp_path)[case]
    code = main(["generate", *map(str, args), "--max-new-tokens", "5"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_script_prints_no_traceback_unless_verbose(tmp_path):
    quiet = run_cli("generate", "--checkpoint-path", tmp_path)
    assert quiet.returncode == 2
    assert "Traceback" not in quiet.stderr and quiet.stderr.startswith("Error: ")
    loud = run_cli("generate", "--checkpoint-path", tmp_path, "--verbose")
    assert loud.returncode != 0
    assert "Traceback" in loud.stderr
