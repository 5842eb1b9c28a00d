"""What a decoder hands the engine, the plain one-sequence decoder, and the prefix match both the
engine and the speculative decoder use to tell how much of a KV cache is still valid.

Decoders only produce tokens; the batched engine's core (torchchat.generation.batch.BatchEngine)
keeps the budget, stop ids, the ids each cache row holds, positions and statistics for every decoder.
These pieces live here, below both the core and torchchat.generation.speculative, so that the core
imports the decoders and no decoder imports it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from torchchat.generation.sampling import SamplingParams, default_generator, exp_noise
from torchchat.generation.steps import Steps


@dataclass
class DecodeStep:
    """What a decoder produced for one fed token: the next tokens (at least one). Every token but the
    last is now in the KV cache, after the fed one."""

    tokens: list[int]
    proposed: int = 0  # speculative decoding: draft tokens proposed ...
    accepted: int = 0  # ... and accepted


class PlainDecoder:
    """One token per forward for the one sequence of a one-slot engine, through Steps.decode: forward
    and sampling fused in one step (one compiled graph under --compile, one CUDA graph on the fused
    CUDA model). Produces tokens only."""

    k = 0

    def __init__(self, steps: Steps, device: torch.device, vocab_size: int):
        self.steps, self.device, self.vocab_size = steps, device, vocab_size
        self._default = default_generator(device)
        # The last step's output tensor: fed back as it is when it is the next input, so the decode loop
        # makes no host-to-device copy per token.
        self._last: torch.Tensor | None = None
        self._last_id = -1

    def step(self, x: int, history: Sequence[int], params: SamplingParams, room: int,
             generator: torch.Generator) -> DecodeStep:
        """Feed `x` at position len(history); the next token, drawn with `generator`."""
        fed = self._last.clone() if self._last is not None and self._last_id == x else \
            torch.tensor([[x]], dtype=torch.int64, device=self.device)
        pos = torch.tensor([len(history)], device=self.device)
        decode = self.steps.decode(params)
        if params.greedy or generator is self._default:
            # The process's generator: the step draws its noise itself (inside the compiled graph, where
            # drawing costs nothing next to the ~0.6 ms an eager draw over a 32K vocabulary takes here).
            nxt = decode(fed, pos)
        else:
            nxt = decode(fed, pos, exp_noise(1, self.vocab_size, generator, self.device))
        self._last, self._last_id = nxt, int(nxt)
        return DecodeStep([self._last_id])


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share: the cache positions whose K/V can be reused."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
