"""Tensor parallelism over 2 gloo ranks on the CPU for Llama's relatives, from tiny random Hugging Face
folders: q/k/v bias (Qwen2), q/k norms with head_dim != dim / heads (Qwen3), soft-capping and GeGLU
(Gemma 2), sliding and global layers with their own RoPE (Gemma 3), fused qkv / gate_up with partial
LongRoPE (Phi-3, split at load and sharded like Llama's), NoPE layers (SmolLM3). Each rank's logits
(prefill and cached decode) equal one process's. All families share one 2-process launch."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))

from hf_family_folders import write_folder  # noqa: E402
from test_hf_families import CASES, FAMILIES  # noqa: E402
from tests.distributed.tp_family_worker import build, prefill_and_steps, tp_logits  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """family -> (one process's logits, {rank: that rank's logits}) from a single 2-rank launch."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    folders = {}  # BASE's 4 heads, 2 KV heads and 96 hidden units split over 2 ranks
    for family, (case, tok) in FAMILIES.items():
        config_cls, model_cls, kwargs = CASES[case]
        folders[family] = tmp_path_factory.mktemp(family)
        write_folder(folders[family], config_cls, model_cls, kwargs, tok)
    ids = list(range(3, 35))  # past Gemma's 8-position sliding window
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, start_method="spawn")
    ranks = elastic_launch(config, tp_logits)([str(f) for f in folders.values()], ids)
    return {family: (prefill_and_steps(build(str(folder)).runtime.forward, ids),
                     {rank: out[str(folder)] for rank, out in ranks.items()})
            for family, folder in folders.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_logits_equal_one_process(results, family):
    one, ranks = results[family]
    assert sorted(ranks) == [0, 1]
    for logits in ranks.values():
        torch.testing.assert_close(logits, one, atol=1e-5, rtol=1e-5)
