"""Speculative decoding: a small draft model proposes k tokens one at a time, the target model checks
all of them in one forward over k+1 positions and keeps the longest acceptable prefix plus one token
of its own.

Greedy (temperature 0): a draft token is kept iff it is the target's argmax at that position, so the
output is exactly the target's own greedy output. Sampling: draft token d with draft probability
q(d) and target probability p(d) is kept with probability min(1, p(d) / q(d)); at the first rejection
the token is drawn from normalize(max(p - q, 0)), and when all k are kept a bonus token is drawn from
the target's next distribution. The output is then distributed exactly as the target's own samples
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding").

Both models keep static KV caches: rejected positions are simply overwritten later, since attention
at position p only reads positions <= p. The draft never affects what is generated, only how fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from torchchat.errors import UserInputError
from torchchat.generation.decoding import DecodeStep, common_prefix_len
from torchchat.generation.sampling import SamplingParams, logits_to_probs, sample_from_probs

if TYPE_CHECKING:
    from torchchat.runtime.base import Runtime


@dataclass
class Draft:
    runtime: "Runtime"
    k: int  # tokens proposed per step
    kv_ids: list[int] = field(default_factory=list)  # ids whose K/V the draft's cache holds at [0, len)

    @classmethod
    def create(cls, runtime: "Runtime", k: int, max_seq_len: int, target: "Runtime") -> "Draft":
        if k < 1:
            raise UserInputError("--speculate-k must be at least 1")
        if runtime.config.vocab_size != target.config.vocab_size:
            raise UserInputError(
                f"the draft model's vocabulary ({runtime.config.vocab_size}) differs from the target's "
                f"({target.config.vocab_size}); speculative decoding needs a draft with the same tokenizer"
            )
        if not target.supports_parallel_prefill:
            raise UserInputError("speculative decoding needs a target model that runs several tokens per "
                                 "forward; this runtime takes one at a time")
        if runtime.max_seq_len < max_seq_len:
            raise UserInputError(f"the draft model's context ({runtime.max_seq_len}) is shorter than the "
                                 f"target's ({max_seq_len}); lower --max-seq-length")
        runtime.setup(1, max_seq_len)
        return cls(runtime, k)


def _forward(runtime: "Runtime", ids: Sequence[int], start: int, device) -> Tensor:
    """Logits (S, V) of `ids` fed at positions [start, start + S)."""
    tokens = torch.tensor([list(ids)], dtype=torch.int64, device=device)
    pos = torch.arange(start, start + len(ids), device=device)
    with torch.no_grad():
        return runtime.forward(tokens, pos)[0]


def _leading_true(mask: Tensor) -> int:
    """How many leading entries of a 1-D bool tensor are True."""
    return int(mask.to(torch.int64).cumprod(0).sum())


def propose(draft: Draft, feed: Sequence[int], start: int, k: int, params: SamplingParams,
            device, generator: torch.Generator | None = None) -> tuple[list[int], Tensor | None]:
    """Feed `feed` to the draft at positions [start, ...), then draw k tokens (from `generator`,
    default the process's), feeding each but the last. Returns the tokens and their draft
    probabilities (k, V) (None when greedy)."""
    logits = _forward(draft.runtime, feed, start, device)[-1]
    pos = start + len(feed)
    tokens, probs = [], []
    for i in range(k):
        if params.greedy:
            tok = int(torch.argmax(logits))
        else:
            q = logits_to_probs(logits, params)
            tok = int(sample_from_probs(q, generator=generator))
            probs.append(q)
        tokens.append(tok)
        if i < k - 1:
            logits = _forward(draft.runtime, [tok], pos, device)[-1]
            pos += 1
    return tokens, (torch.stack(probs) if probs else None)


def verify(target_logits: Tensor, proposed: list[int], draft_probs: Tensor | None,
           params: SamplingParams, generator: torch.Generator | None = None) -> tuple[int, int]:
    """target_logits: (k+1, V) for the positions of [x, d_1..d_k]. Returns (n accepted, next token);
    random draws come from `generator` (default: the process's)."""
    k = len(proposed)
    d = torch.tensor(proposed, dtype=torch.int64, device=target_logits.device)
    if params.greedy:
        best = torch.argmax(target_logits, dim=-1)  # (k+1,)
        n = _leading_true(best[:k] == d)
        return n, int(best[n])
    p = logits_to_probs(target_logits, params)  # (k+1, V)
    if k == 0:
        return 0, int(sample_from_probs(p[0], generator=generator))
    rows = torch.arange(k, device=p.device)
    pd, qd = p[rows, d], draft_probs[rows, d]
    accept = (pd >= qd) | (torch.rand(k, device=p.device, generator=generator) * qd < pd)
    n = _leading_true(accept)
    if n == k:
        return n, int(sample_from_probs(p[k], generator=generator))
    residual = torch.clamp(p[n] - draft_probs[n], min=0.0)
    total = residual.sum()
    # p == q exactly leaves nothing to draw from, but then a rejection has probability zero.
    residual = residual / total if total > 0 else p[n]
    return n, int(sample_from_probs(residual, generator=generator))


class SpeculativeDecoder:
    """Produces tokens only: the batched engine's core (torchchat.generation.batch) does the
    bookkeeping (budget, stop ids, the ids the cache holds, positions, stats) for this decoder as for
    the plain one (torchchat.generation.decoding.PlainDecoder). The core prefills the prompt with the
    target alone; the draft catches up in the first `step`."""

    def __init__(self, runtime: "Runtime", draft: Draft):
        self.runtime, self.draft = runtime, draft
        self.k = draft.k

    def step(self, x: int, history: Sequence[int], params: SamplingParams, room: int,
             generator: torch.Generator | None = None) -> DecodeStep:
        """Feed `x` at position len(history) (the target's cache holds `history`); return 1..room tokens."""
        draft, device = self.draft, self.runtime.device
        pos = len(history)
        k = min(draft.k, room - 1)
        if k == 0:
            logits = _forward(self.runtime, [x], pos, device)
            return DecodeStep([verify(logits, [], None, params, generator)[1]])
        # Bring the draft up to date: what it lacks of the sequence so far, then x. Positions of
        # unknown content (-1) are fed as token 0: only the acceptance rate can suffer.
        valid = common_prefix_len(draft.kv_ids, history)
        feed = [max(i, 0) for i in history[valid:]] + [x]
        del draft.kv_ids[valid:]
        proposed, q = propose(draft, feed, valid, k, params, device, generator)
        draft.kv_ids += list(history[valid:]) + [x] + proposed[: k - 1]
        logits = _forward(self.runtime, [x] + proposed, pos, device)  # (k+1, V)
        n, nxt = verify(logits, proposed, q, params, generator)
        # The draft holds d_1..d_{k-1}; only accepted ones are part of the sequence.
        del draft.kv_ids[pos + 1 + n :]
        # The target's cache now holds x and the accepted drafts: exactly the tokens before the last.
        return DecodeStep(proposed[:n] + [nxt], proposed=k, accepted=n)
