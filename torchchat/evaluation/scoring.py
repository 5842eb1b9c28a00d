"""Log-likelihood of token continuations through a runtime's forward, batched with right padding.

Every forward starts at position 0. The KV cache is static and written at `input_pos`, and the causal
mask hides positions after the current one, so whatever an earlier sequence left in the cache is never
read: scoring one sequence after another from position 0 is exact. Rows of a batch are right-padded;
a row's logits depend only on its own causal prefix, so the padding after its last token changes
nothing that is scored.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from torchchat.errors import ContextLengthError

Forward = Callable[[Tensor, Tensor], Tensor]  # tokens (B, S) int64, input_pos (S,) int64 -> logits (B, S, V)


@dataclass(frozen=True)
class Score:
    logprob: float  # natural log-probability of the continuation, summed over its tokens
    greedy: bool  # every continuation token is the most likely one at its position


@dataclass
class ForwardTimer:
    """A forward function that records each call's wall time in seconds. It waits for the device
    before stopping the clock, so asynchronous GPU work is counted in the call that launched it."""

    forward: Forward
    device: torch.device
    seconds: list[float] = field(default_factory=list)

    def __call__(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        start = time.perf_counter()
        logits = self.forward(tokens, input_pos)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()
        self.seconds.append(time.perf_counter() - start)
        return logits


def forward_time_lines(seconds: Sequence[float]) -> list[str]:
    """The original torchchat's summary of forward time: total, number of calls, per-call spread."""
    if not seconds:
        return ["Time in model.forward: 0.00s, over 0 model evaluations"]
    return [
        f"Time in model.forward: {sum(seconds):.2f}s, over {len(seconds)} model evaluations",
        f"forward run time stats - Median: {statistics.median(seconds):.4f}s Min: {min(seconds):.4f}s "
        f"Max: {max(seconds):.4f}s Mean: {statistics.fmean(seconds):.4f}s",
    ]


def _inputs(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], int]:
    """(model input ids, number of scored positions at its end). The input is context + continuation
    without its last id, cut from the left to `max_len` ids."""
    if not continuation:
        raise ValueError("a continuation to score needs at least one token")
    if len(continuation) > max_len:
        raise ContextLengthError(
            f"a continuation of {len(continuation)} tokens does not fit the {max_len}-token context; "
            "raise --max-seq-length (up to the model's own limit)"
        )
    whole = (list(context) + list(continuation))[-(max_len + 1):]
    return whole[:-1], len(continuation)


def _score_rows(logits: Tensor, rows: list[tuple[list[int], int]], targets: list[list[int]]) -> list[Score]:
    """logits: (B, S, V) for right-padded rows; row i scores its last k_i real positions."""
    scores = []
    for i, ((ids, k), target) in enumerate(zip(rows, targets)):
        n = len(ids)
        logprobs = torch.log_softmax(logits[i, n - k : n].float(), dim=-1)  # (k, V)
        want = torch.tensor(target, device=logprobs.device).view(-1, 1)
        total = logprobs.gather(-1, want).sum()
        greedy = bool((logprobs.argmax(-1) == want.view(-1)).all())
        scores.append(Score(float(total), greedy))
    return scores


def score_continuations(
    forward: Forward,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_len: int,
    batch_size: int,
    device: torch.device,
    parallel: bool = True,
    pad_id: int = 0,
    progress: Callable[[int], object] | None = None,
) -> list[Score]:
    """Score each (context ids, continuation ids) pair: the log-probability of the continuation
    given the context. Requests run longest first, `batch_size` rows per forward (the runtime must
    be set up for that many rows and `max_len` positions). With `parallel=False` the runtime takes
    one token per call (an export without dynamic shapes) and `batch_size` must be 1.
    `progress` is called with the number of requests each forward finished.
    Returns one Score per request, in request order."""
    if not parallel and batch_size != 1:
        raise ValueError("a runtime without parallel prefill scores one row at a time")
    prepared = [_inputs(c, x, max_len) for c, x in requests]
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[Score | None] = [None] * len(prepared)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [prepared[i] for i in chunk]
        targets = [list(requests[i][1]) for i in chunk]
        width = max(len(ids) for ids, _ in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        for r, (ids, _) in enumerate(rows):
            tokens[r, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        tokens = tokens.to(device)
        if parallel:
            logits = forward(tokens, torch.arange(width, device=device))
        else:
            logits = torch.cat(
                [forward(tokens[:, p : p + 1], torch.tensor([p], device=device)) for p in range(width)], dim=1
            )
        for i, s in zip(chunk, _score_rows(logits, rows, targets)):
            results[i] = s
        if progress is not None:
            progress(len(chunk))
    return results  # type: ignore[return-value]
