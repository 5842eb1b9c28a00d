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


def give_own_storage(model: torch.nn.Module) -> None:
    """Copy parameters that are views into a larger storage (a memory-mapped llama2.c or GGUF file)
    into storage of their own: AOT Inductor serialises each constant's whole storage, so 48 views
    of one 1 MB file would become a 50 MB library. A parameter shared by two modules (tied
    embeddings) stays shared."""
    copies: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if type(p) is not torch.nn.Parameter:
                    continue  # tensor subclasses (quantized weights) own packed storage already
                if id(p) not in copies and p.untyped_storage().nbytes() > p.numel() * p.element_size():
                    copies[id(p)] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                if id(p) in copies:
                    setattr(module, name, copies[id(p)])


def export_forward(model: torch.nn.Module, max_seq_len: int, dynamic: bool) -> ExportedProgram:
    """Trace `model` with a KV cache of `max_seq_len` positions for batch 1. dynamic: the sequence
    dimension S of tokens (dim 1) and input_pos (dim 0) may be any of [1, max_seq_len] (parallel
    prefill); otherwise S == 1 (one token per call)."""
    if max_seq_len < 2 and dynamic:
        raise ExportError("--max-seq-length must be at least 2 with dynamic shapes")
    give_own_storage(model)
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
