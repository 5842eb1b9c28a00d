"""Prefill and decode steps: forward + sampling. This is the only place torch.compile is applied, and
the compiled functions are returned to the caller rather than installed anywhere."""
from __future__ import annotations

import time
import types
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import Tensor

from torchchat.generation.sampling import SamplingParams, sample

Forward = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CompileOptions:
    decode: bool = False  # --compile
    prefill: bool = False  # --compile-prefill
    max_autotune: bool = False
    # Told when a compiled step's first call starts compiling and when it is done (10-50 s of silence
    # otherwise); the CLI prints these lines on stderr.
    notify: Callable[[str], None] | None = field(default=None, compare=False)


class _AnnouncedCompile:
    """A torch.compile'd step that says so around its first call, where the compiling happens."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], what: str, notify: Callable[[str], None]):
        self.fn, self.what, self.notify = fn, what, notify
        self.compiled = False

    def __call__(self, *inputs: Tensor) -> Tensor:
        if self.compiled:
            return self.fn(*inputs)
        self.notify(f"Compiling the {self.what} step with torch.compile (first run ~10-50 s)...")
        t0 = time.perf_counter()
        out = self.fn(*inputs)
        self.compiled = True
        self.notify(f"Compiled the {self.what} step in {time.perf_counter() - t0:.1f} s")
        return out


def _step(forward: Forward, params: SamplingParams) -> Callable[..., Tensor]:
    def step(tokens: Tensor, input_pos: Tensor, noise: Tensor | None = None) -> Tensor:
        """tokens (B, S), input_pos (S,) -> next token (B, 1) sampled from the last position. `noise`
        (B, V): the Exp(1) draws to sample with (a request's own generator); None draws them inside
        the step from the process's generator, which a compiled step does without leaving the graph."""
        logits = forward(tokens, input_pos)
        return sample(logits[:, -1], params, noise).view(-1, 1)

    return step


class CudaGraphStep:
    """A step function replayed from CUDA graphs: the whole forward (and sampling) in one launch.

    For forwards made of kernels that need no compiler (torchchat.kernels' fused model). The first call
    at each input shape runs the function once eagerly (compiling the kernels; it writes the same
    KV-cache entries and draws from the same random generator as the replay that follows), captures
    it, and replays. One graph per input shape is kept (the batched engine's buckets: 1, 2, 4, ...
    rows, each with its own static inputs and output), so moving between buckets replays without
    capturing again. A change of `key()` (the runtime's cache size: the captured addresses) drops
    them all. The returned tensor is the graph's output buffer, overwritten by the next replay of
    that graph: copy what you keep."""

    def __init__(self, fn: Callable[..., Tensor], key: Callable[[], Hashable], capture_error_mode: str = "global"):
        self.fn, self.key = fn, key
        # "relaxed" for an AOT Inductor package: the compiled model's host code is not ours to audit
        # for calls a "global" capture refuses (its multi-threaded container queried a CUDA event per
        # call; runtime/aoti_archive.py now loads it single-threaded). Relaxed is what ran on the H100.
        self.capture_error_mode = capture_error_mode
        self._key: Hashable = None
        # input shapes -> (graph, static inputs, output buffer)
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Tensor]] = {}
        self._graph: torch.cuda.CUDAGraph | None = None  # the last replayed (bench/gpu_bench.py replays it)

    def __call__(self, *inputs: Tensor) -> Tensor:
        """inputs: tokens, input_pos and optionally the sampling noise, as the step takes them."""
        key = self.key()
        if key != self._key:
            self._graphs.clear()
            self._key = key
        shapes = tuple(tuple(t.shape) for t in inputs)
        if shapes not in self._graphs:
            self._graphs[shapes] = self._capture(inputs)
        graph, static, out = self._graphs[shapes]
        for s, given in zip(static, inputs):
            s.copy_(given)
        graph.replay()
        self._graph = graph
        return out

    @property
    def graphs(self) -> int:
        """How many graphs are held (one per input shape seen since the last cache change)."""
        return len(self._graphs)

    def _capture(self, inputs: tuple[Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Tensor]:
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
            out = self.fn(*static)
        return graph, static, out


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """`fn` over a copy of its code object. Dynamo keeps compiled graphs per code object, so every step
    made by `_step` (each runtime's, each sampling setting's) would otherwise share one cache, told
    apart only by guards on the modules and closures: with a code object of its own a compiled step's
    cache holds only its own graph, and the module guards `_skip_module_guards` drops are not needed
    to tell steps apart."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _skip_module_guards(entries) -> list[bool]:
    """Dynamo's guard filter for a decode step: keep every guard on the step's arguments, closure and
    globals and the shape/dtype guards on module buffers (the KV caches, which `setup` reallocates),
    drop the ones on module attributes and parameters. A stories110M step has ~2300 guards, ~2260 of
    them on the model's modules, 74 kept; checking them took 4.5% of a compiled CPU decode step's
    profile (0.5% after), and the step ran ~6% faster (s110m Q4_K_M, one thread: median 202 against
    191 tok/s, 8 interleaved rounds in one process). A filter that kept the parameters' tensor guards
    gained nothing (docs/performance.md): walking the module tree down to them is the cost. The model
    is not changed in place after its steps are compiled (build, quantization and layout come first);
    a parameter swapped for one of another shape would not be noticed."""
    return [not e.orig_guard.source.is_unspecialized_nn_module()
            or (e.guard_type == "TENSOR_MATCH" and not isinstance(e.value, torch.nn.Parameter)) for e in entries]


def compile_forward(forward: Forward) -> Forward:
    """`forward` compiled for any (B, S): what `eval --compile` scores with. Dynamic shapes from the
    start, since scoring batches come in many lengths (a static compile would recompile for each)."""
    return torch.compile(forward, fullgraph=True, dynamic=True)


class Steps:
    """Builds (and caches, per sampling setting) the prefill and decode functions for one runtime.

    `graph_key`, given by runtimes whose forward can be captured into a CUDA graph as it is, makes
    the compiled decode step a CudaGraphStep on CUDA instead of a torch.compile'd function.
    `precompiled`: the forward is compiled already (an AOT Inductor package), so --compile is not asked
    for; with a graph_key its decode step is captured all the same, since launching its few hundred
    kernels one by one from the host costs more than the 7B step's GPU time leaves room for."""

    def __init__(self, forward: Forward, device: torch.device, options: CompileOptions = CompileOptions(),
                 graph_key: Callable[[], Hashable] | None = None, forward_last: Forward | None = None,
                 precompiled: bool = False):
        self.forward = forward
        # Prefill samples from the last position only; a runtime that can skip the other positions'
        # logits (EagerRuntime.forward_last) saves the output matrix times S-1 rows.
        self.forward_last = forward_last or forward
        self.device = device
        self.options = options
        self.graph_key = graph_key if device.type == "cuda" else None
        self._graph_decode = self.graph_key is not None and (options.decode or precompiled)
        self._capture_mode = "relaxed" if precompiled else "global"
        self._cache: dict[tuple[str, SamplingParams], Callable[[Tensor, Tensor], Tensor]] = {}

    def _compile(self, fn, dynamic: bool):
        compiled = self._torch_compile(fn, dynamic)
        if self.options.notify is None:
            return compiled
        return _AnnouncedCompile(compiled, "prefill" if dynamic else "decode", self.options.notify)

    def _torch_compile(self, fn, dynamic: bool):
        if self.options.max_autotune:
            mode = "max-autotune"
        elif self.device.type == "cuda" and not dynamic:
            # CUDA graphs remove per-kernel launch overhead, which dominates the decode step at batch 1.
            mode = "reduce-overhead"
        else:
            mode = "default"
        if self.device.type == "cpu" and not dynamic and mode == "default":
            # Inductor's C++ wrapper calls the step's ~50 kernels from C++ instead of Python: 6% off a
            # compiled stories15M decode step on this 2-core CPU, measured side by side.
            options = {"cpp_wrapper": True}
            if isinstance(fn, types.FunctionType):
                fn, options["guard_filter_fn"] = _own_code(fn), _skip_module_guards
            return torch.compile(fn, fullgraph=True, dynamic=False, options=options)
        return torch.compile(fn, fullgraph=True, dynamic=dynamic, mode=mode)

    def decode_forward(self) -> Forward:
        """The forward alone, for decode steps whose caller samples itself (several rows with their
        own parameters, logprobs, penalties): compiled with static shapes under --compile, so each
        batch bucket gets its own graph (a CudaGraphStep's graph for runtimes with a graph_key)."""
        key = ("decode_forward", None)
        if key not in self._cache:
            fn = self.forward
            if self._graph_decode:
                fn = CudaGraphStep(fn, self.graph_key, self._capture_mode)
            elif self.options.decode:
                fn = self._compile(fn, dynamic=False)
            self._cache[key] = fn
        return self._cache[key]

    def prefill_forward(self, last_only: bool) -> Forward:
        """The forward alone for prompt chunks, compiled for all lengths under --compile-prefill;
        `last_only`: the last position's logits are all the caller needs (forward_last)."""
        key = ("prefill_forward", last_only)
        if key not in self._cache:
            fn = self.forward_last if last_only else self.forward
            self._cache[key] = self._compile(fn, dynamic=True) if self.options.prefill else fn
        return self._cache[key]

    def decode(self, params: SamplingParams) -> Callable[[Tensor, Tensor], Tensor]:
        key = ("decode", params)
        if key not in self._cache:
            fn = _step(self.forward, params)
            if self._graph_decode:
                fn = CudaGraphStep(fn, self.graph_key, self._capture_mode)
            elif self.options.decode:
                fn = self._compile(fn, dynamic=False)
            self._cache[key] = fn
        return self._cache[key]

    def prefill(self, params: SamplingParams) -> Callable[[Tensor, Tensor], Tensor]:
        key = ("prefill", params)
        if key not in self._cache:
            fn = _step(self.forward_last, params)
            self._cache[key] = self._compile(fn, dynamic=True) if self.options.prefill else fn
        return self._cache[key]
