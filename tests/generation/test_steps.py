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


def test_decode_step_samples_with_the_noise_it_is_given():
    """A request's own generator hands the fused step its Exp(1) noise; the step then picks what
    sampling.sample picks with that noise, and what the process's generator seeded alike picks."""
    from torchchat.generation.sampling import exp_noise, sample

    torch.manual_seed(0)
    logits = torch.randn(1, 1, 64)
    forward = lambda tokens, pos: logits  # noqa: E731
    params = SamplingParams(temperature=1.0, top_k=20)
    step = Steps(forward, torch.device("cpu")).decode(params)
    drawn = []
    for seed in range(20):
        noise = exp_noise(1, 64, torch.Generator().manual_seed(seed), torch.device("cpu"))
        got = step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), noise)
        assert int(got) == int(sample(logits[:, -1], params, noise))
        torch.manual_seed(seed)
        assert int(step(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))) == int(got)
        drawn.append(int(got))
    assert len(set(drawn)) > 1


def test_precompiled_cuda_runtimes_graph_their_decode_step_without_compile():
    """An AOT Inductor package on CUDA (precompiled, with a graph_key) gets a CUDA-graph decode step
    although --compile is refused for it; its capture is relaxed (the package's model container
    queries its last run's event). Only the step objects are built here: nothing runs on a GPU."""
    from torchchat.generation.sampling import SamplingParams
    from torchchat.generation.steps import CompileOptions, CudaGraphStep, Steps

    def forward(tokens, input_pos):
        raise AssertionError("not called")

    cuda = torch.device("cuda")
    steps = Steps(forward, cuda, CompileOptions(), graph_key=lambda: "k", precompiled=True)
    step = steps.decode(SamplingParams())
    assert isinstance(step, CudaGraphStep) and step.capture_error_mode == "relaxed"
    assert isinstance(steps.decode_forward(), CudaGraphStep)
    # Not precompiled and no --compile: launched as it is. On the CPU a graph_key is ignored.
    assert not isinstance(Steps(forward, cuda, CompileOptions(), graph_key=lambda: "k").decode(SamplingParams()),
                          CudaGraphStep)
    cpu_steps = Steps(forward, torch.device("cpu"), CompileOptions(), graph_key=lambda: "k", precompiled=True)
    assert not isinstance(cpu_steps.decode(SamplingParams()), CudaGraphStep)
    fused = Steps(forward, cuda, CompileOptions(decode=True), graph_key=lambda: "k").decode(SamplingParams())
    assert isinstance(fused, CudaGraphStep) and fused.capture_error_mode == "global"

def test_cpu_decode_steps_compile_over_their_own_code_with_module_guards_filtered(monkeypatch):
    from torchchat.generation import steps as steps_mod

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append((fn, kw)) or fn)
    steps = Steps(lambda t, p: torch.zeros(1, t.shape[1], 8), torch.device("cpu"), CompileOptions(decode=True))
    steps.decode(SamplingParams(temperature=0))
    steps.decode(SamplingParams(temperature=1.0))
    (a, kw), (b, _) = seen
    assert a.__code__ is not b.__code__  # each step's graphs in a cache of its own
    assert kw["options"]["guard_filter_fn"] is steps_mod._skip_module_guards


def test_filtered_guards_still_see_a_buffer_reallocated():
    """The decode step keeps the guards on module buffers: a KV-cache-like buffer of a new size
    recompiles instead of running the old graph."""
    class M(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(8))
            self.register_buffer("cache", torch.arange(n, dtype=torch.float32))

        def forward(self, tokens, pos):  # logits: the cache padded to 8 (argmax: its last index)
            logits = torch.nn.functional.pad(self.cache, (0, 8 - self.cache.shape[0])) * self.w
            return logits.view(1, 1, 8).expand(1, tokens.shape[1], 8)

    m = M(4)
    step = Steps(m, torch.device("cpu"), CompileOptions(decode=True)).decode(SamplingParams(temperature=0))
    tok = torch.zeros(1, 1, dtype=torch.long)
    assert int(step(tok, torch.tensor([0]))) == 3
    m.register_buffer("cache", torch.arange(6, dtype=torch.float32))
    assert int(step(tok, torch.tensor([0]))) == 5
    with torch.no_grad():  # parameters are read at each call, so new values need no guard
        m.w.copy_(torch.tensor([0, 1.0, 0, 0, 0, 0, 0, 0]))
    assert int(step(tok, torch.tensor([0]))) == 1
