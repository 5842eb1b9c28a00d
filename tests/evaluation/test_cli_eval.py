"""`torchchat eval` end to end: output lines, the results JSON, and one-line errors."""
from __future__ import annotations

import json
import re

import pytest

from torchchat.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")


@pytest.fixture
def model_args(stories260k_dir) -> list[str]:
    return ["--checkpoint-path", str(stories260k_dir / "stories260K.bin"),
            "--tokenizer-path", str(stories260k_dir / "tok512.model"), "--dtype", "fp32"]


def test_eval_prints_timing_and_metrics_and_writes_json(model_args, tmp_path, capsys):
    out = tmp_path / "out" / "results.json"
    code = main(["eval", *model_args, "--tasks", "storybook_cloze", "storybook_gen", "--limit", "4",
                 "--max-seq-length", "128", "--output-json", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^Time to run eval: [\d.]+s\.$", stdout, re.M)
    assert re.search(r"^Time in model\.forward: [\d.]+s, over \d+ model evaluations$", stdout, re.M)
    stats = r"^forward run time stats - Median: [\d.]+s Min: [\d.]+s Max: [\d.]+s Mean: [\d.]+s$"
    assert re.search(stats, stdout, re.M)
    assert "For model stories260K.bin" in stdout
    saved = json.loads(out.read_text())
    cloze, gen = saved["results"]["storybook_cloze"], saved["results"]["storybook_gen"]
    assert 0.0 <= cloze["acc,none"] <= 1.0 and 0.0 <= gen["exact_match,none"] <= 1.0
    assert saved["n-samples"]["storybook_cloze"]["effective"] == 4
    assert saved["config"]["max_length"] == 128 and saved["config"]["batch_size"] == 8
    row = re.search(r"^\|storybook_cloze\s*\|.*\|acc\s*\|[^|]*\|\s*([\d.]+)\|", stdout, re.M)  # Metric, arrow, Value
    assert row and float(row.group(1)) == pytest.approx(cloze["acc,none"], abs=1e-4)


def test_default_task_offline_is_one_line_and_comes_before_the_model_is_built(tmp_path, capsys):
    """wikitext (the default) needs the Hub. The tokenizer path is a folder, which building the model
    would reject: getting the task error proves tasks are resolved first."""
    code = main(["eval", "--params-table", "stories260K", "--dummy-weights", "--tokenizer-path", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and err.startswith("Error: task 'wikitext' needs its dataset")


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "--limit must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--tasks-dir", "/no/such/folder"], "not a folder"),
])
def test_bad_flags_are_one_line_errors(model_args, flags, message, capsys):
    code = main(["eval", *model_args, "--tasks", "storybook_cloze", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err


@pytest.mark.slow
def test_unknown_task_lists_the_available_ones(model_args, capsys):
    """Deciding that a name is unknown indexes lm-eval's whole registry (~14,000 task files)."""
    code = main(["eval", *model_args, "--tasks", "storybook_cloze", "wikitxt"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("Error:")]
    assert "unknown task 'wikitxt'; did you mean wikitext" in line
    assert "local tasks: storybook, storybook_cloze, storybook_gen, storybook_ppl" in line
    assert "lm-eval ls tasks" in line
