"""Pure, seedable sampling with no host-device synchronisation (so it compiles into the decode step)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = 200
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits: (..., V) -> probabilities (..., V) after temperature, top-k and top-p (nucleus) masking."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from_probs(probs: Tensor) -> Tensor:
    """Draw one index per row without torch.multinomial's sync: argmax(p / E), E ~ Exp(1) (the
    exponential-race form of the Gumbel trick). probs: (..., V) -> (...,) int64."""
    noise = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / noise, dim=-1)


def sample(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits: (..., V) -> token ids (...,) int64."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    return sample_from_probs(logits_to_probs(logits, params))
