import pytest
import torch

from torchchat.model.config import ModelConfig
from torchchat.model.transformer import Transformer

from tests.conftest import random_transformer


def _random(cfg: ModelConfig) -> Transformer:
    return random_transformer(cfg, std=0.1)


@pytest.mark.parametrize("n_kv_heads", [8, 4, 1])
def test_cached_decode_equals_full_forward(tiny_config, n_kv_heads):
    from dataclasses import replace

    model = _random(replace(tiny_config, n_kv_heads=n_kv_heads))
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 24))
    with torch.no_grad():
        model.setup_caches(2, 64)
        full = model(tokens, torch.arange(24))
        prefix = model(tokens[:, :10], torch.arange(10))  # prefill 10, then decode the rest one by one
        steps = [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_gives_the_last_positions_logits_and_the_same_cache(tiny_model):
    """Prefill's `last_only` skips the output matrix for all but the last position; the caches it
    leaves (what decoding continues from) are the full forward's."""
    from torchchat.runtime.base import EagerRuntime

    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        tiny_model.setup_caches(2, 32)
        full = tiny_model(tokens, torch.arange(12))
        full_next = tiny_model(tokens[:, :1], torch.tensor([12]))
        last = EagerRuntime(tiny_model).forward_last(tokens, torch.arange(12))
        last_next = tiny_model(tokens[:, :1], torch.tensor([12]))
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_next, full_next, atol=1e-5, rtol=1e-5)


def test_later_positions_do_not_change_earlier_logits(tiny_model):
    tokens = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        tiny_model.setup_caches(1, 32)
        a = tiny_model(tokens, torch.arange(16))
        b = tiny_model(torch.cat([tokens[:, :8], torch.zeros(1, 8, dtype=torch.long)], 1), torch.arange(16))
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_tied_embeddings_share_storage(tiny_config):
    from dataclasses import replace

    model = Transformer(replace(tiny_config, tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight


def test_forward_without_setup_says_what_to_do(tiny_model):
    fresh = Transformer(tiny_model.config)
    with pytest.raises(RuntimeError, match="setup_caches"):
        fresh(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))


def test_context_is_capped_at_model_limit(tiny_model):
    tiny_model.setup_caches(1, 10_000)
    assert tiny_model.max_seq == tiny_model.config.max_seq_len
