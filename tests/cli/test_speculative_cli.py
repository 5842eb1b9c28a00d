"""`generate` with a draft model: the same greedy text as the model alone, and the acceptance rate reported."""
from __future__ import annotations

import json

from tests.cli.helpers import run_cli


def test_generate_with_a_draft_prints_the_models_own_text(stories260k_dir, tmp_path):
    from tests.generation.runtimes import stories_runtime
    from torchchat.generation.engine import Engine, GenerationConfig
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import Steps
    from torchchat.tokenizer.load import load_tokenizer

    prompt = "Once upon a time"
    model, tokenizer = stories260k_dir / "stories260K.bin", stories260k_dir / "tok512.model"
    metrics = tmp_path / "metrics.json"
    result = run_cli("generate", "--checkpoint-path", model, "--tokenizer-path", tokenizer, "--device", "cpu",
                     "--dtype", "fp32", "--temperature", "0", "--prompt", prompt, "--max-new-tokens", "60",
                     "--draft-checkpoint-path", model, "--speculate-k", "4", "--metrics-json", metrics)
    assert result.returncode == 0, result.stderr

    tok = load_tokenizer(tokenizer)
    runtime = stories_runtime(stories260k_dir)
    engine = Engine(runtime, tok, Steps(runtime.forward, runtime.device), 512)
    cfg = GenerationConfig(max_new_tokens=60, sampling=SamplingParams(temperature=0.0))
    alone = "".join(r.text for r in engine.stream(tok.encode(prompt, bos=True), cfg))
    assert result.stdout == prompt + alone + "\n"

    assert "Acceptance rate:" in result.stderr and "k=4" in result.stderr
    sample = json.loads(metrics.read_text())["samples"][0]
    assert 0.9 < sample["acceptance_rate"] <= 1.0  # the draft is the model itself
