"""What a decoder hands the engine, the plain decoder, and the prefix match both the engine and the
speculative decoder use to tell how much of a KV cache is still valid.

Decoders only produce tokens; the Engine (torchchat.generation.engine) keeps the budget, stop ids, KV
ids, positions and statistics for every decoder. These pieces live here, below both the engine and
torchchat.generation.speculative, so that the engine imports the decoders and no decoder imports it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from torchchat.generation.sampling import SamplingParams
from torchchat.generation.steps import Steps


@dataclass
class DecodeStep:
    """What a decoder produced for one fed token: the next tokens (at least one). Every token but the
    last is now in the KV cache, after the fed one."""

    tokens: list[int]
    proposed: int = 0  # speculative decoding: draft tokens proposed ...
    accepted: int = 0  # ... and accepted


class PlainDecoder:
    """One token per forward: the prefill and decode steps (torchchat.generation.steps) as they are.
    Produces tokens only; the Engine does the bookkeeping."""

    k = 0

    def __init__(self, steps: Steps, device: torch.device, parallel_prefill: bool):
        self.steps, self.device, self.parallel_prefill = steps, device, parallel_prefill
        # The last step's output tensor: fed back as it is when it is the next input, so the decode loop
        # makes no host-to-device copy per token (as before the decoders were split out).
        self._last: torch.Tensor | None = None
        self._last_id = -1

    def prefill(self, prompt_ids: Sequence[int], start_pos: int, params: SamplingParams) -> int:
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=self.device)
        if self.parallel_prefill:
            pos = torch.arange(start_pos, start_pos + len(prompt_ids), device=self.device)
            nxt = self.steps.prefill(params)(prompt, pos)
        else:
            decode = self.steps.decode(params)
            for i in range(len(prompt_ids)):
                nxt = decode(prompt[:, i : i + 1], torch.tensor([start_pos + i], device=self.device))
        self._last, self._last_id = nxt, int(nxt)
        return self._last_id

    def step(self, x: int, history: Sequence[int], params: SamplingParams, room: int) -> DecodeStep:
        """Feed `x` at position len(history); the next token."""
        fed = self._last.clone() if self._last is not None and self._last_id == x else \
            torch.tensor([[x]], dtype=torch.int64, device=self.device)
        nxt = self.steps.decode(params)(fed, torch.tensor([len(history)], device=self.device))
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
