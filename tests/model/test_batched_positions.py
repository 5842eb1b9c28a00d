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


def test_per_row_positions_equal_separate_runs(tiny_model):
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
