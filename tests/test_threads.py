"""The default CPU thread count (torchchat/runtime/threads.py) and --num-threads."""
import pytest
import torch

from torchchat.runtime.threads import default_threads, set_threads


@pytest.mark.parametrize("load, cores, expected", [
    (0.0, 2, 2), (0.4, 2, 2),  # idle
    (1.0, 2, 1), (0.6, 2, 1),  # one core busy elsewhere: the other one only
    (7.3, 2, 1),  # an overloaded machine still gets one thread
    (2.2, 8, 6), (0.0, 1, 1),
])
def test_default_leaves_out_the_cores_others_keep_busy(load, cores, expected):
    assert default_threads(load=load, cores=cores) == expected


def test_set_threads_explicit_and_default():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        n = set_threads(None)
        assert 1 <= n == torch.get_num_threads()
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_num_threads_flag_reaches_the_build_spec():
    import argparse

    from torchchat.cli.args import add_build, add_model_source, build_spec
    from torchchat.errors import UserInputError

    p = argparse.ArgumentParser()
    add_model_source(p)
    add_build(p)
    args = p.parse_args(["--params-table", "stories15M", "--dummy-weights", "--num-threads", "1", "--no-cpu-kernels"])
    spec = build_spec(args)
    assert spec.num_threads == 1 and spec.cpu_kernels is False
    with pytest.raises(UserInputError, match="--num-threads must be at least 1"):
        build_spec(p.parse_args(["--params-table", "stories15M", "--num-threads", "0"]))
