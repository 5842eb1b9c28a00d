"""Speculative decoding: greedy output identical to the target alone (stories260K target, with a
stories260K draft and with a random draft that disagrees), and the sampling rule reproduces the
target's distribution."""
from __future__ import annotations

import pytest
import torch

from tests.generation.runtimes import random_runtime, stories_runtime
from torchchat.errors import UserInputError
from torchchat.generation.engine import Engine, GenerationConfig
from torchchat.generation.sampling import SamplingParams
from torchchat.generation.speculative import verify
from torchchat.generation.steps import Steps

GREEDY = SamplingParams(temperature=0.0)


class _StopIds:
    """Engine.tokens only asks a tokenizer for its stop ids; these tests give them in the config."""

    stop_ids = frozenset()


def _engine(runtime, max_seq=512) -> Engine:
    return Engine(runtime, _StopIds(), Steps(runtime.forward, runtime.device), max_seq)


@pytest.fixture(scope="module")
def target(stories260k_dir):
    return _engine(stories_runtime(stories260k_dir))


@pytest.fixture(scope="module")
def stories_draft(stories260k_dir):
    return stories_runtime(stories260k_dir)


@pytest.fixture(scope="module")
def baseline(target):
    """Greedy output of the target alone: BOS then 200 tokens."""
    target.draft = None
    cfg = GenerationConfig(max_new_tokens=200, sampling=GREEDY, stop_ids=frozenset())
    return list(target.tokens([1], cfg))


def _run(engine, draft_runtime, k, cfg, prompt=(1,)):
    engine.attach_draft(draft_runtime, k)
    try:
        out = list(engine.tokens(list(prompt), cfg))
    finally:
        engine.draft = None
    return out, engine.last_stats


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_identical_with_the_same_model_as_draft(target, stories_draft, baseline, k):
    cfg = GenerationConfig(max_new_tokens=200, sampling=GREEDY, stop_ids=frozenset())
    out, stats = _run(target, stories_draft, k, cfg)
    assert out == baseline
    assert stats.draft_proposed > 0
    assert stats.acceptance_rate > 0.95  # the same weights agree except on rounding ties


@pytest.mark.parametrize("k", [2, 5])
def test_greedy_identical_with_a_draft_that_disagrees(target, baseline, k):
    cfg = GenerationConfig(max_new_tokens=200, sampling=GREEDY, stop_ids=frozenset())
    out, stats = _run(target, random_runtime(seed=k), k, cfg)
    assert out == baseline
    assert 0 < stats.draft_proposed
    assert stats.draft_accepted < stats.draft_proposed  # rejections happened and were repaired


def test_stop_token_and_budget_same_as_target(target, stories_draft, baseline):
    stop = baseline[37]
    first = baseline.index(stop)
    cfg = GenerationConfig(max_new_tokens=200, sampling=GREEDY, stop_ids=frozenset({stop}))
    out, _ = _run(target, stories_draft, 5, cfg)
    assert out == baseline[: first + 1]
    for n in (1, 2, 7, 13):
        cfg = GenerationConfig(max_new_tokens=n, sampling=GREEDY, stop_ids=frozenset())
        out, stats = _run(target, random_runtime(seed=3), 4, cfg)
        assert out == baseline[:n]
        assert stats.generated_tokens == n


def test_context_end_same_as_target(stories260k_dir):
    """At the end of a short context, speculation shrinks k and stops where the target alone stops."""
    engine = _engine(stories_runtime(stories260k_dir), max_seq=40)
    cfg = GenerationConfig(max_new_tokens=500, sampling=GREEDY, stop_ids=frozenset())
    alone = list(engine.tokens([1, 403, 407], cfg))
    assert len(alone) == 40 - 3
    out, _ = _run(engine, stories_runtime(stories260k_dir), 6, cfg, prompt=(1, 403, 407))
    assert out == alone


def test_kv_ids_track_what_the_cache_holds(target, stories_draft, baseline):
    cfg = GenerationConfig(max_new_tokens=30, sampling=GREEDY, stop_ids=frozenset())
    out, _ = _run(target, stories_draft, 4, cfg)
    assert target.kv_ids[: 30] == [1] + out[:29]
    assert target.position == 30


def test_draft_must_share_the_vocabulary(target):
    with pytest.raises(UserInputError, match="vocabulary"):
        target.attach_draft(random_runtime(vocab_size=256), 3)
    with pytest.raises(UserInputError, match="at least 1"):
        target.attach_draft(random_runtime(), 0)


def test_sampled_acceptance_rule_reproduces_the_target_distribution():
    """First token out of one speculative step, with d ~ q: P(token) must equal p[0] exactly."""
    torch.manual_seed(0)
    V, k, trials = 6, 3, 12000
    params = SamplingParams(temperature=1.0, top_k=None)
    target_logits = torch.randn(k + 1, V) * 1.5
    draft_probs = torch.softmax(torch.randn(k, V) * 1.5, dim=-1)
    p0 = torch.softmax(target_logits[0], dim=-1)
    drafts = torch.multinomial(draft_probs, trials, replacement=True).T.tolist()  # (trials, k)
    counts = torch.zeros(V)
    accepted = 0
    for d in drafts:
        n, nxt = verify(target_logits, d, draft_probs, params)
        counts[d[0] if n > 0 else nxt] += 1
        accepted += n > 0
    tv = 0.5 * (counts / trials - p0).abs().sum()
    assert tv < 0.02, (counts / trials, p0)
    expected_accept = torch.minimum(p0, draft_probs[0]).sum()  # P(accept d_1) = sum_x min(p, q)
    assert abs(accepted / trials - float(expected_accept)) < 0.02


def test_sampled_speculative_generation_runs_and_reports(target, stories_draft):
    torch.manual_seed(1)
    cfg = GenerationConfig(max_new_tokens=50, sampling=SamplingParams(temperature=0.8, top_k=40), stop_ids=frozenset())
    out, stats = _run(target, stories_draft, 4, cfg)
    assert len(out) == 50 and all(0 <= t < 512 for t in out)
    assert stats.draft_proposed > 0 and 0.0 < stats.acceptance_rate <= 1.0
