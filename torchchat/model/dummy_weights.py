"""Random (--dummy-weights) parameter values, drawn per parameter name.

Its own model-level module because both the one-process build (torchchat.build) and the
tensor-parallel build (torchchat.distributed.tensor_parallel) draw the same values, and the
build imports the tensor-parallel code: keeping the drawing here leaves no import circle."""
from __future__ import annotations

import zlib

import torch

# Random weights are drawn this many values at a time (bounded float32 scratch on the device).
_DUMMY_CHUNK = 1 << 24


def dummy_tensor(name: str, shape: torch.Size, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The random (--dummy-weights) value of one parameter: N(0, 0.02) from a generator seeded by
    `seed` and the parameter's name, norm weights 1 and biases 0. Depending only on the name makes the
    weights the same whatever order or grouping a build path materializes them in."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if name.endswith("norm.weight"):
        return out.fill_(1.0)
    if name.endswith(".bias"):
        return out.zero_()
    gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
    flat = out.view(-1)
    scratch = torch.empty(min(flat.numel(), _DUMMY_CHUNK), dtype=torch.float32, device=device)
    for a in range(0, flat.numel(), _DUMMY_CHUNK):
        part = scratch[: min(_DUMMY_CHUNK, flat.numel() - a)]
        flat[a : a + part.numel()].copy_(part.normal_(0.0, 0.02, generator=gen))
    return out


def init_dummy_weights(model: torch.nn.Module, device: str, dtype: torch.dtype, seed: int) -> None:
    """Replace every parameter of a (meta-initialised) Transformer with its `dummy_tensor` value on
    `device`, re-tying the output to the embeddings where the config ties them."""
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for pname, p in list(module.named_parameters(recurse=False)):
                name = f"{module_name}.{pname}" if module_name else pname
                setattr(module, pname, torch.nn.Parameter(dummy_tensor(name, p.shape, device, dtype, seed)))
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
