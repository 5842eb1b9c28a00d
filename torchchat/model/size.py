"""How many bytes a model's weights hold, and how many one decode step reads.

These are facts about the model, so they live beside it: quantization reports them, export writes
them into an artifact's metadata, and generation's metrics divide them by the decode time. None of
those layers has to import another for them."""
from __future__ import annotations

import torch
from torch import Tensor


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor really stores: for tensor subclasses (torchao quantized weights), the sum of the
    inner tensors (packed data, scales, zero points); for a DTensor, this rank's shard (its device mesh,
    also an inner attribute, is not a tensor)."""
    if type(t) not in (Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, n) for n in names)
        return sum(tensor_bytes(x) for x in inner if isinstance(x, Tensor))
    return t.numel() * t.element_size()


def weight_nbytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters hold, quantized tensors at what they really store (packed data,
    scales, zero points); a tied weight counts once."""
    return sum(tensor_bytes(p) for p in model.parameters())


def bytes_read_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter once, except the embedding table, of which
    one row is read (unless it is tied to the output projection, which reads it whole). KV-cache and
    RoPE buffers are not counted."""
    seen: set[int] = set()
    total = 0
    embedding_ptrs = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = getattr(model, "output", None)
    weight = getattr(output, "weight", None)  # a TransposedLinear (torchchat.model.layout) has none and is not tied
    tied = weight is not None and id(weight) in embedding_ptrs
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = tensor_bytes(p)
        if id(p) in embedding_ptrs and not tied:
            size = size // max(p.shape[0], 1)
        total += size
    return total
