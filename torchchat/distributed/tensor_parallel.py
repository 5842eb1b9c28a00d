"""Megatron-style tensor parallelism for the Transformer with PyTorch's DTensor stack.

Column-wise: wq, wk, wv, w1, w3 (each rank computes its heads / its slice of the hidden layer);
row-wise: wo, w2 (partial sums, all-reduced). Embedding, norms and output stay replicated. Each rank
takes only its slice of every sharded checkpoint tensor, so none holds the full set of linear weights.
The relatives' switches need nothing more: q/k/v biases shard with their columns, q/k norms and
soft-capping act within a head, and Phi-3's fused qkv / gate_up arrive split (wq/wk/wv, w1/w3) from the
loader; a layout that restacks them (torchchat.model.layout) leaves DTensors alone."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchchat.errors import DeviceError, UserInputError
from torchchat.model.config import ModelConfig
from torchchat.model.dummy_weights import dummy_tensor


@dataclass(frozen=True)
class TPContext:
    rank: int
    world_size: int
    device: str  # this rank's device: "cpu" or "cuda:<local rank>"
    mesh: object  # torch.distributed.device_mesh.DeviceMesh over all ranks


def init_tp(tp: int, device: str) -> TPContext:
    """Join the torchrun job as one of `tp` ranks: gloo on the CPU, NCCL on CUDA (one GPU per local rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from torchchat.distributed.launch import apply_safe_env

    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise UserInputError(f"--tp {tp} but torchrun started {world} processes; give --nproc-per-node {tp} (or drop torchrun)")
    apply_safe_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    base = device.split(":")[0]
    if base == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise DeviceError(f"--tp {tp} on cuda needs {tp} GPUs per host, this host has {torch.cuda.device_count()}")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif base != "cpu":
        raise DeviceError(f"--tp runs on cpu (gloo) or cuda (NCCL), not {base}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base == "cuda" else "gloo")
    mesh = init_device_mesh(base, (tp,))
    return TPContext(rank=dist.get_rank(), world_size=tp, device=device, mesh=mesh)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_seed(seed: int | None) -> int:
    """Every rank must draw the same samples: rank 0's seed (its own random one when None) for all."""
    import torch.distributed as dist

    value = torch.tensor([seed if seed is not None else int(torch.randint(0, 2**62, (1,)))], dtype=torch.int64)
    dist.broadcast(value, src=0)
    return int(value)


def check_shardable(config: ModelConfig, tp: int) -> None:
    """Heads, KV heads and the hidden layer must split evenly over `tp` ranks."""
    for what, n in (("attention heads", config.n_heads), ("KV heads", config.n_kv_heads),
                    ("feed-forward hidden size", config.hidden_dim)):
        if n % tp:
            raise UserInputError(f"--tp {tp}: the model's {n} {what} do not divide by {tp}; "
                                 f"pick a --tp that divides {config.n_heads} heads and {config.n_kv_heads} KV heads")


def parallelize(model: nn.Module, mesh) -> None:
    """Shard a (meta-device) Transformer's linear layers over `mesh` and set each Attention to its
    local head counts (n_heads/N, n_kv_heads/N), which its views and KV cache then use."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    check_shardable(model.config, tp)
    col, row = ColwiseParallel(), RowwiseParallel()
    for block in model.layers:
        # src_data_rank=None: each rank slices locally, nothing is scattered (weights come later anyway).
        parallelize_module(block.attention, mesh, {"wq": col, "wk": col, "wv": col, "wo": row}, src_data_rank=None)
        parallelize_module(block.feed_forward, mesh, {"w1": col, "w3": col, "w2": row}, src_data_rank=None)
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp


def _local_slice(full: Tensor, placements, rank: int, world: int) -> Tensor:
    """This rank's part of `full` for a 1-D mesh placement (Shard(d) or Replicate)."""
    from torch.distributed.tensor import Shard

    (placement,) = placements
    if isinstance(placement, Shard):
        return full.chunk(world, dim=placement.dim)[rank]
    return full


def materialize(model: nn.Module, state_dict: dict[str, Tensor] | None, ctx: TPContext, dtype: torch.dtype,
                seed: int) -> None:
    """Give a parallelized meta-device model real weights: from the (memory-mapped) `state_dict`, each
    rank copying only its slice of a sharded tensor; or, with `state_dict` None, the same random weights
    a one-process --dummy-weights build draws (each full tensor drawn, sliced, and dropped)."""
    from torch.distributed.tensor import DTensor

    for name, param in list(model.named_parameters()):
        if state_dict is not None:
            full = state_dict[name]
        else:
            full = dummy_tensor(name, param.shape, ctx.device, torch.float32, seed)
        if isinstance(param, DTensor):
            local = _local_slice(full, param.placements, ctx.rank, ctx.world_size)
            local = local.to(device=ctx.device, dtype=dtype).contiguous()
            value = DTensor.from_local(local, ctx.mesh, param.placements, run_check=False)
        else:
            value = full.to(device=ctx.device, dtype=dtype)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
