"""`generate --tp 2` (two gloo processes on the CPU) against one process: same greedy text, sharded weights."""
import json
import re

import pytest

from tests.cli.helpers import run_cli

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=128)
COMMON = ["--dtype", "fp32", "--device", "cpu", "--temperature", "0", "--max-new-tokens", "50",
          "--prompt", "Once upon a time"]


def _sharded_bytes(metrics_path) -> int:
    return json.loads(metrics_path.read_text())["model_bytes_per_token"]


def _linear_bytes(cfg: dict, hidden: int) -> int:
    """fp32 bytes of the sharded layers (wq/wk/wv/wo and w1/w2/w3) over all blocks."""
    head_dim = cfg["dim"] // cfg["n_heads"]
    attn = 2 * cfg["dim"] * cfg["n_heads"] * head_dim + 2 * cfg["dim"] * cfg["n_kv_heads"] * head_dim
    return 4 * cfg["n_layers"] * (attn + 3 * cfg["dim"] * hidden)


def _one_and_two(tmp_path, *model_args):
    one = run_cli("generate", *model_args, *COMMON, "--metrics-json", tmp_path / "one.json")
    two = run_cli("generate", *model_args, *COMMON, "--tp", "2", "--metrics-json", tmp_path / "two.json")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    return one, two


def test_stories260k_tp2_prints_what_one_process_prints(stories260k_dir, tmp_path):
    one, two = _one_and_two(tmp_path, "--checkpoint-path", stories260k_dir / "stories260K.bin",
                            "--tokenizer-path", stories260k_dir / "tok512.model")
    assert two.stdout == one.stdout
    assert len(one.stdout) > 100 and one.stdout.startswith("Once upon a time")
    # Only rank 0 reports: one metrics block, not two.
    assert two.stderr.count("Average tokens/sec (total)") == 1
    # stories260K: dim 64, hidden 172, 5 layers, 8 heads, 4 KV heads; rank 0 holds half of the linear layers.
    cfg = dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4)
    assert _sharded_bytes(tmp_path / "one.json") - _sharded_bytes(tmp_path / "two.json") == _linear_bytes(cfg, 172) // 2


def test_random_model_tp2_prints_what_one_process_prints(stories260k_dir, tmp_path):
    params = tmp_path / "small.json"
    params.write_text(json.dumps(SMALL))
    one, two = _one_and_two(tmp_path, "--params-path", params, "--dummy-weights",
                            "--tokenizer-path", stories260k_dir / "tok512.model")
    assert two.stdout == one.stdout
    assert len(one.stdout) > len("Once upon a time\n")
    hidden = 192  # 2/3 * 4 * 64 rounded up to a multiple of 32
    assert _sharded_bytes(tmp_path / "one.json") - _sharded_bytes(tmp_path / "two.json") == _linear_bytes(SMALL, hidden) // 2


def test_heads_that_do_not_split_get_one_clear_line(stories260k_dir, tmp_path):
    params = tmp_path / "odd.json"
    params.write_text(json.dumps(dict(SMALL, dim=96, n_heads=6, n_kv_heads=3)))
    r = run_cli("generate", "--params-path", params, "--dummy-weights", "--tokenizer-path",
                stories260k_dir / "tok512.model", *COMMON, "--tp", "2")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["Error: --tp 2: the model's 3 KV heads do not divide by 2; pick a --tp that divides 6 heads and 3 KV heads"]
    assert r.stdout == ""


@pytest.mark.slow
def test_seeded_sampling_agrees_across_ranks(stories260k_dir):
    """Sampled (not greedy) text: every rank must draw the same token, and the draws match one process."""
    args = ["generate", "--checkpoint-path", stories260k_dir / "stories260K.bin", "--tokenizer-path",
            stories260k_dir / "tok512.model", "--dtype", "fp32", "--temperature", "1.0", "--seed", "7",
            "--max-new-tokens", "40", "--prompt", "Once upon a time"]
    one, two = run_cli(*args), run_cli(*args, "--tp", "2")
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout


@pytest.mark.parametrize("flags, pattern", [
    (["--tp", "0"], "--tp must be >= 1"),
    (["--tp", "2", "--quantize", '{"linear:int8": {}}'], "--quantize does not run with --tp"),
    (["--tp", "2", "--draft-model", "stories15M"], r"speculative decoding \(--draft-model"),
])
def test_bad_tp_flags_rejected_before_launch(flags, pattern, stories260k_dir, capsys):
    from torchchat.cli import main

    code = main(["generate", "--checkpoint-path", str(stories260k_dir / "stories260K.bin"), *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert re.match(f"Error: {pattern}", err) and err.count("\n") == 1, err
