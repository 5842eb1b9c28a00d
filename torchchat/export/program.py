"""The exported program both backends compile: the Transformer's forward(tokens, input_pos) -> logits,
traced by torch.export with its static KV cache inside as buffers updated in place."""
from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from torchchat.errors import ExportError


def example_inputs(max_seq_len: int, dynamic: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (1, S) int64, input_pos (S,) int64). With dynamic shapes S is 2: an example of size 1
    would make torch.export specialise the sequence dimension to 1."""
    n = 2 if dynamic and max_seq_len >= 2 else 1
    return torch.zeros(1, n, dtype=torch.int64, device=device), torch.arange(n, dtype=torch.int64, device=device)


def export_forward(model: torch.nn.Module, max_seq_len: int, dynamic: bool) -> ExportedProgram:
    """Trace `model` with a KV cache of `max_seq_len` positions for batch 1. dynamic: the sequence
    dimension S of tokens (dim 1) and input_pos (dim 0) may be any of [1, max_seq_len] (parallel
    prefill); otherwise S == 1 (one token per call)."""
    if max_seq_len < 2 and dynamic:
        raise ExportError("--max-seq-length must be at least 2 with dynamic shapes")
    model.setup_caches(1, max_seq_len)
    device = model.norm.weight.device
    tokens, input_pos = example_inputs(max_seq_len, dynamic, device)
    shapes = None
    if dynamic:
        seq = Dim("seq", min=1, max=max_seq_len)
        shapes = ({1: seq}, {0: seq})
    try:
        with torch.no_grad():
            return torch.export.export(model, (tokens, input_pos), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many kinds; all mean the same to the user
        raise ExportError(f"torch.export could not trace the model: {str(e).splitlines()[0]} (--verbose for details)") from e
