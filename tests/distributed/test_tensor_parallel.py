"""Shard-plan checks that need no process group."""
import pytest

from torchchat.errors import UserInputError


def _config(**overrides):
    from torchchat.model.config import ModelConfig

    params = dict(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=32)
    return ModelConfig.from_params({**params, **overrides})


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_divisible_models_pass(tp):
    from torchchat.distributed.tensor_parallel import check_shardable

    check_shardable(_config(), tp)


@pytest.mark.parametrize("overrides, tp, what", [
    ({}, 8, "4 KV heads"),
    ({}, 3, "8 attention heads"),
    ({"hidden_dim": 170}, 4, "170 feed-forward hidden size"),
])
def test_indivisible_models_name_what_does_not_split(overrides, tp, what):
    from torchchat.distributed.tensor_parallel import check_shardable

    with pytest.raises(UserInputError, match=what):
        check_shardable(_config(**overrides), tp)


def test_nvlink_multicast_stays_off_unless_the_user_says(monkeypatch):
    import os

    from torchchat.distributed import launch

    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")
    launch.apply_safe_env()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "0"
