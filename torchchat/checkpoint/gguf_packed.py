"""GGUF weights kept in their block formats (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) for the native CPU
kernels (torchchat.model.packed, torchchat.kernels.cpu).

Each packed tensor is read from the file once, with `readinto` into its own uint8 tensor, rather than
viewed through the reader's memory map: pages of a file mapping stay in the process's resident set
after they are read, so copying out of the map would count the weights twice until the map is closed,
and a view would pin the whole map (and every page the kernels touch) for the model's lifetime. Read
this way, resident memory for the weights is their size in the file."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from torchchat.model.packed import GGML_IDS, row_bytes

# Weights a packed kernel can stand in for: the F.linear ones and the embedding lookup.
PACKABLE_WEIGHTS = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "output.weight",
    "tok_embeddings.weight", "attention.wqkv.weight",  # Phi-3's fused q|k|v, split by rows at load
)


def packable(type_name: str, our_name: str) -> bool:
    """Whether a GGUF tensor of this type, mapped to this parameter name, stays packed."""
    return type_name in GGML_IDS and our_name.endswith(PACKABLE_WEIGHTS)


def read_blocks(path: Path, tensor) -> Tensor:
    """A gguf ReaderTensor's bytes as a uint8 tensor (rows, row_bytes), read straight from the file.
    GGUF dims are innermost first: the row length is the first, the row count their product after it."""
    qtype = GGML_IDS[tensor.tensor_type.name]
    dims = [int(d) for d in tensor.shape]
    k, rows = dims[0], 1
    for d in dims[1:]:
        rows *= d
    out = torch.empty((rows, row_bytes(qtype, k)), dtype=torch.uint8)
    view = memoryview(out.numpy()).cast("B")
    if len(view) != tensor.n_bytes:
        raise ValueError(f"{tensor.name}: {len(view)} bytes expected, the file says {tensor.n_bytes}")
    with open(path, "rb") as f:
        f.seek(tensor.data_offset)
        got = f.readinto(view)
    if got != len(view):
        raise ValueError(f"{tensor.name}: the file ends {len(view) - got} bytes early")
    return out
