"""Rows of one batch at different positions (batched serving) compute what each row alone computes."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on a busy 2-core machine spin against each other; a tiny model needs one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gemma_like():
    """Every per-layer switch the batched path must carry: a sliding-window layer with its own RoPE
    base, soft-capped attention, sandwich norms, q/k norms, GeGLU."""
    from torchchat.model.config import ModelConfig

    from tests.conftest import random_transformer

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=128,
                      max_seq_len=64, qk_norm=True, activation="gelu_tanh", sandwich_norms=True,
                      attn_softcap=50.0, final_softcap=30.0, sliding_window=4, sliding_layers=(0,),
                      rope_local_base=10000.0, rope_base=1e6)
    return random_transformer(cfg)


@pytest.mark.parametrize("family", ["llama", "gemma-like"])
def test_per_row_positions_equal_separate_runs(tiny_model, family):
    if family != "llama":
        tiny_model = _gemma_like()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 512, (1, n)) for n in (5, 9, 2)]
    # Reference: each sequence alone, in cache row 0, then one decode step.
    ref = []
    for p in prompts:
        tiny_model.setup_caches(1, 32)
        tiny_model(p, torch.arange(p.size(1)))
        nxt = torch.tensor([[7]])
        ref.append(tiny_model(nxt, torch.tensor([p.size(1)]))[0, -1])
    # Batched: each prompt prefilled into its own row, then one decode step for all rows together.
    tiny_model.setup_caches(4, 32)
    tiny_model.max_batch = -1  # force fresh zeroed caches
    tiny_model.setup_caches(4, 32)
    for row, p in enumerate(prompts):
        tiny_model(p, torch.arange(p.size(1)), row=row)
    pos = torch.tensor([[p.size(1)] for p in prompts])
    out = tiny_model(torch.full((3, 1), 7), pos)[:, -1]
    for row in range(3):
        torch.testing.assert_close(out[row], ref[row], rtol=1e-5, atol=1e-5)
