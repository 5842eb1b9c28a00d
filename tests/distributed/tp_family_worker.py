"""The rank side of test_tp_families.py: each of 2 gloo ranks builds every folder's model sharded over
both and returns its logits (prefill, then one token at a time through the KV cache)."""
from __future__ import annotations

from pathlib import Path

import torch

MAX_SEQ = 64


def prefill_and_steps(forward, ids: list[int], prefill: int = 8) -> torch.Tensor:
    """Logits (1, len(ids), V): a prefill of the first `prefill` ids, then one call per id."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        out = [forward(tokens[:, :prefill], torch.arange(prefill))]
        out += [forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(prefill, len(ids))]
    return torch.cat(out, dim=1).float()


def build(folder: str, tp=None):
    from torchchat.build import BuildSpec, ModelSource, build_model

    built = build_model(BuildSpec(source=ModelSource(checkpoint_path=Path(folder)), dtype=torch.float32, tp=tp,
                                  max_seq_len=MAX_SEQ))
    built.runtime.setup(1, MAX_SEQ)
    return built


def tp_logits(folders: list[str], ids: list[int]) -> dict[str, torch.Tensor]:
    """Run inside a 2-process torchrun-style job (torch.distributed.launcher.api.elastic_launch)."""
    from torchchat.distributed.tensor_parallel import init_tp, shutdown

    torch.set_num_threads(1)
    ctx = init_tp(2, "cpu")
    try:
        return {folder: prefill_and_steps(build(folder, ctx).runtime.forward, ids) for folder in folders}
    finally:
        shutdown()
