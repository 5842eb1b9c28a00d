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


def sample_from_probs(probs: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row without torch.multinomial's sync: argmax(p / E), E ~ Exp(1) (the
    exponential-race form of the Gumbel trick). probs: (..., V) -> (...,) int64. `noise`: E given by
    the caller (same shape as probs), else drawn here from `generator` (default: the process's)."""
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def sample(logits: Tensor, params: SamplingParams, noise: Tensor | None = None) -> Tensor:
    """logits: (..., V) -> token ids (...,) int64. `noise`: see sample_from_probs."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    return sample_from_probs(logits_to_probs(logits, params), noise)


def exp_noise(rows: int, vocab: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(rows, V) Exp(1) draws from `generator`, in the order sample_from_probs draws them: a row of a
    batch gets the numbers that sequence would get alone."""
    return torch.empty(rows, vocab, device=device).exponential_(1, generator=generator)


def default_generator(device: torch.device) -> torch.Generator:
    """The process's random generator for `device` (what torch.manual_seed seeds): sampling from it
    continues the same stream as code that passes no generator at all."""
    if device.type == "cuda":
        # The generators exist once torch's CUDA state is initialized: an AOT Inductor model runs on the GPU
        # without that having happened (seen: an empty tuple, IndexError, on `generate --aoti-package-path`).
        torch.cuda.init()
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "cpu":
        return torch.default_generator
    # Other backends keep their default generators in their own modules; a fresh one seeded from the
    # CPU stream keeps `torch.manual_seed` meaningful there.
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, (1,))))
    return g
