import torch

from torchchat.generation.sampling import SamplingParams, logits_to_probs, sample


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    assert sample(logits, SamplingParams(temperature=0)).tolist() == [1]


def test_top_k_keeps_exactly_k():
    logits = torch.randn(4, 100)
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=5))
    assert ((probs > 0).sum(-1) == 5).all()
    top = logits.topk(5).indices
    assert (probs.gather(-1, top) > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_top_p_keeps_smallest_set_reaching_p():
    # probs 0.5, 0.3, 0.15, 0.05: p=0.7 keeps {0.5, 0.3}; p=0.8 keeps the same (0.5+0.3 reaches 0.8)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=None, top_p=0.7))
    assert (kept > 0).tolist() == [[False, True, False, True]]
    torch.testing.assert_close(kept[0, [1, 3]], torch.tensor([0.625, 0.375]))
    kept = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=None, top_p=0.81))
    assert (kept > 0).tolist() == [[False, True, True, True]]
    # a tiny p still keeps the most likely token
    kept = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=None, top_p=0.01))
    assert (kept > 0).tolist() == [[False, True, False, False]]


def test_seed_reproduces_and_samples_follow_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    params = SamplingParams(temperature=1.0, top_k=None)
    torch.manual_seed(7)
    a = sample(logits, params)
    torch.manual_seed(7)
    b = sample(logits, params)
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / a.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
