"""Continuation scoring through the Runtime protocol: against a plain full-sequence forward, and
batched, padded, truncated and one-token-at-a-time variants against each other."""
from __future__ import annotations

import pytest
import torch

from torchchat.errors import ContextLengthError
from torchchat.evaluation.scoring import ForwardTimer, forward_time_lines, score_continuations
from torchchat.runtime.base import EagerRuntime

MAX = 64


@pytest.fixture
def runtime(tiny_model):
    return EagerRuntime(tiny_model)


def _requests(seed: int, n: int = 7) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c = int(torch.randint(1, 30, (1,), generator=g))
        k = int(torch.randint(1, 8, (1,), generator=g))
        ids = torch.randint(0, 512, (c + k,), generator=g).tolist()
        out.append((ids[:c], ids[c:]))
    return out


def _by_hand(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unpadded forward over context + continuation; sum log p(continuation[j] | everything before)."""
    ids = torch.tensor([context + continuation])
    model.setup_caches(1, MAX)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.size(1)))[0]  # (S, V)
    logprobs = torch.log_softmax(logits.double(), -1)
    total, greedy = 0.0, True
    for j, tok in enumerate(continuation):
        pos = len(context) + j - 1  # the position whose logits predict this token
        total += float(logprobs[pos, tok])
        greedy &= int(logprobs[pos].argmax()) == tok
    return total, greedy


def _score(runtime, requests, batch, **kw):
    runtime.setup(batch, MAX)
    with torch.no_grad():
        return score_continuations(runtime.forward, requests, max_len=MAX, batch_size=batch, device=runtime.device,
                                   **kw)


def test_scores_match_a_full_forward_summed_by_hand(runtime, tiny_model):
    requests = _requests(0)
    scores = _score(runtime, requests, 1)
    for (ctx, cont), s in zip(requests, scores):
        want, greedy = _by_hand(tiny_model, ctx, cont)
        assert s.logprob == pytest.approx(want, abs=1e-4)
        assert s.greedy == greedy


@pytest.mark.parametrize("batch", [2, 3, 8])
def test_batched_right_padded_equals_unbatched(runtime, batch):
    requests = _requests(1, n=9)
    one = _score(runtime, requests, 1)
    many = _score(runtime, requests, batch)
    assert [s.greedy for s in many] == [s.greedy for s in one]
    for a, b in zip(one, many):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


def test_one_token_per_call_equals_parallel(runtime):
    requests = _requests(2, n=4)
    parallel = _score(runtime, requests, 1)
    sequential = _score(runtime, requests, 1, parallel=False)
    for a, b in zip(parallel, sequential):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


def test_long_context_is_cut_from_the_left(runtime):
    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, 512, (MAX + 20,), generator=g).tolist()
    continuation = [5, 6, 7]
    long = _score(runtime, [(context, continuation)], 1)[0]
    keep = MAX + 1 - len(continuation)  # the input holds MAX ids: the last ones of context + continuation[:-1]
    cut = _score(runtime, [(context[-keep:], continuation)], 1)[0]
    assert long.logprob == pytest.approx(cut.logprob, abs=1e-5)


def test_greedy_flag_follows_the_argmax(runtime, tiny_model):
    context = [1, 17, 99, 3]
    ids = list(context)
    model = tiny_model
    for _ in range(3):  # the model's own greedy continuation
        model.setup_caches(1, MAX)
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1].argmax()))
    greedy_cont = ids[len(context):]
    other = [(greedy_cont[0] + 1) % 512, *greedy_cont[1:]]
    a, b = _score(runtime, [(context, greedy_cont), (context, other)], 2)
    assert a.greedy and not b.greedy
    assert a.logprob > b.logprob


def test_continuation_longer_than_the_context_window_is_refused(runtime):
    with pytest.raises(ContextLengthError, match="--max-seq-length"):
        _score(runtime, [([1], list(range(MAX + 1)))], 1)


def test_forward_timer_records_each_call(runtime):
    timer = ForwardTimer(runtime.forward, runtime.device)
    runtime.setup(2, MAX)
    with torch.no_grad():
        score_continuations(timer, _requests(4, n=5), max_len=MAX, batch_size=2, device=runtime.device)
    assert len(timer.seconds) == 3  # 5 requests, 2 rows per forward
    assert all(s > 0 for s in timer.seconds)
    lines = forward_time_lines(timer.seconds)
    assert lines[0].startswith("Time in model.forward: ") and lines[0].endswith("over 3 model evaluations")
    assert lines[1].startswith("forward run time stats - Median: ")
