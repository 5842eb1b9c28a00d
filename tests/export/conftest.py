"""Shared by the export tests: stories260K's files and helpers to run the CLI in-process. Exports are
minutes of compiling on 2 cores, so each test module builds its artifacts once (module fixtures)."""
from __future__ import annotations

import pytest
import torch

from torchchat.cli import main


@pytest.fixture(scope="session")
def stories_args(stories260k_dir) -> list[str]:
    return ["--checkpoint-path", str(stories260k_dir / "stories260K.bin"),
            "--tokenizer-path", str(stories260k_dir / "tok512.model")]


@pytest.fixture(scope="session")
def tok_args(stories260k_dir) -> list[str]:
    return ["--tokenizer-path", str(stories260k_dir / "tok512.model")]


@pytest.fixture(scope="session")
def golden(stories260k_dir) -> bytes:
    """llama2.c's own output for stories260K: BOS, then 200 greedy steps, decoded."""
    return (stories260k_dir / "expected_greedy_200.txt").read_bytes()


def export(args: list[str]) -> None:
    code = main(["export", *map(str, args)])
    assert code == 0, "export failed (its error is in the captured stderr)"


def generate(capsys, args: list[str], prompt: str = "", n: int = 200) -> tuple[str, str]:
    """Greedy `generate` in-process; returns (stdout, stderr)."""
    capsys.readouterr()
    code = main(["generate", *map(str, args), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def error_line(capsys, args: list[str], command: str = "generate") -> str:
    """Run a command that must fail; returns its one error line."""
    capsys.readouterr()
    code = main([command, *map(str, args), "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def prefill_then_decode(forward, ids: list[int], n_prefill: int, parallel: bool = True) -> torch.Tensor:
    """Logits (1, len(ids), V): the first n_prefill ids in one call (or one at a time), then the
    rest one call each, as generation feeds them."""
    tokens = torch.tensor([ids])
    out = []
    with torch.no_grad():
        if parallel:
            out.append(forward(tokens[:, :n_prefill], torch.arange(n_prefill)))
        else:
            out += [forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(n_prefill)]
        out += [forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(n_prefill, len(ids))]
    return torch.cat(out, dim=1)


def eager_model(stories260k_dir, quantize: str | None = None, dtype=torch.float32, max_seq_len: int = 256):
    """stories260K built as `generate` builds it, with a KV cache of max_seq_len positions."""
    from torchchat.build import BuildSpec, ModelSource, build_model

    plan = None
    if quantize is not None:
        from torchchat.quantize import parse_quantize

        plan = parse_quantize(quantize)
    source = ModelSource(checkpoint_path=stories260k_dir / "stories260K.bin",
                         tokenizer_path=stories260k_dir / "tok512.model")
    built = build_model(BuildSpec(source=source, dtype=dtype, quant=plan, max_seq_len=max_seq_len))
    built.runtime.setup(1, max_seq_len)
    return built
