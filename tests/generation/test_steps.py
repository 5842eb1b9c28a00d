"""Steps: a compiled step says that it compiles on its first call, and only then."""
import torch

from torchchat.generation.sampling import SamplingParams
from torchchat.generation.steps import CompileOptions, Steps


def test_compiled_steps_announce_their_first_call(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    lines = []
    forward = lambda tokens, pos: torch.zeros(1, tokens.shape[1], 8)  # noqa: E731
    steps = Steps(forward, torch.device("cpu"), CompileOptions(decode=True, prefill=True, notify=lines.append))
    decode, prefill = steps.decode(SamplingParams(temperature=0)), steps.prefill(SamplingParams(temperature=0))
    for _ in range(3):
        decode(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    prefill(torch.zeros(1, 4, dtype=torch.long), torch.arange(4))
    assert len(compiled) == 2
    assert len(lines) == 4
    assert lines[0] == "Compiling the decode step with torch.compile (first run ~10-50 s)..."
    assert lines[1].startswith("Compiled the decode step in ") and lines[1].endswith(" s")
    assert lines[2].startswith("Compiling the prefill step")


def test_without_notify_the_compiled_function_is_returned_as_is(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: ("compiled", fn))
    steps = Steps(lambda t, p: t, torch.device("cpu"), CompileOptions(decode=True))
    assert steps.decode(SamplingParams(temperature=0))[0] == "compiled"
