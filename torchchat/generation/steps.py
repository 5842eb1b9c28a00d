"""Prefill and decode steps: forward + sampling. This is the only place torch.compile is applied, and
the compiled functions are returned to the caller rather than installed anywhere."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from torchchat.generation.sampling import SamplingParams, sample

Forward = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CompileOptions:
    decode: bool = False  # --compile
    prefill: bool = False  # --compile-prefill
    max_autotune: bool = False


def _step(forward: Forward, params: SamplingParams) -> Callable[[Tensor, Tensor], Tensor]:
    def step(tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens (B, S), input_pos (S,) -> next token (B, 1) sampled from the last position."""
        logits = forward(tokens, input_pos)
        return sample(logits[:, -1], params).view(-1, 1)

    return step


class Steps:
    """Builds (and caches, per sampling setting) the prefill and decode functions for one runtime."""

    def __init__(self, forward: Forward, device: torch.device, options: CompileOptions = CompileOptions()):
        self.forward = forward
        self.device = device
        self.options = options
        self._cache: dict[tuple[str, SamplingParams], Callable[[Tensor, Tensor], Tensor]] = {}

    def _compile(self, fn, dynamic: bool):
        if self.options.max_autotune:
            mode = "max-autotune"
        elif self.device.type == "cuda" and not dynamic:
            # CUDA graphs remove per-kernel launch overhead, which dominates the decode step at batch 1.
            mode = "reduce-overhead"
        else:
            mode = "default"
        return torch.compile(fn, fullgraph=True, dynamic=dynamic, mode=mode)

    def decode(self, params: SamplingParams) -> Callable[[Tensor, Tensor], Tensor]:
        key = ("decode", params)
        if key not in self._cache:
            fn = _step(self.forward, params)
            self._cache[key] = self._compile(fn, dynamic=False) if self.options.decode else fn
        return self._cache[key]

    def prefill(self, params: SamplingParams) -> Callable[[Tensor, Tensor], Tensor]:
        key = ("prefill", params)
        if key not in self._cache:
            fn = _step(self.forward, params)
            self._cache[key] = self._compile(fn, dynamic=True) if self.options.prefill else fn
        return self._cache[key]
