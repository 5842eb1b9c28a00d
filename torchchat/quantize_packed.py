"""torchchat's own linear recipes on the CPU, stored in GGML block formats and run by the same native
kernels as GGUF files (torchchat.model.packed, torchchat.kernels.cpu):

| recipe | format | weight |
|---|---|---|
| `linear:int8` (bitwidth 8) | Q8_0: fp16 d, 32 int8 codes | d * q, q in [-127, 127] |
| `linear:int4` | Q4_1: fp16 d, fp16 m, 32 4-bit codes | d * q + m, q in [0, 15] (asymmetric) |
| `linear:a8w4dq` | Q4_0: fp16 d, 32 4-bit codes | d * (q - 8) (symmetric) |

A block holds 32 weights of a row; the recipe's groupsize (32..256, or 0 for one scale per row) is kept
by giving every block of a group the group's scale (and minimum). The kernels quantize activations to
int8 per block of 32 for all three, so `linear:a8w4dq`'s dynamic int8 activations are what they do
anyway. The scales are rounded to fp16 (the block format's), and the codes computed against the
rounded scale, so the stored blocks are exactly the weights they stand for. The 4-bit packers are the
kernels' own (torchchat.kernels.cpu.formats); Q8_0 is packed here because the recipe's groups (or one
scale per row) repeat a scale over several blocks, which the kernels' per-block packer does not do."""
from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32
# recipe key -> GGML type id (torchchat/kernels/cpu/formats.py)
RECIPE_TYPES = {"linear:int8": 8, "linear:int4": 3, "linear:a8w4dq": 2}


def _groups(w: Tensor, groupsize: int) -> Tensor:
    """w (N, K) -> (N, K / G, G) float32; G = K for groupsize 0 (per row)."""
    n, k = w.shape
    g = groupsize or k
    return w.detach().float().reshape(n, k // g, g)


def _per_block(values: Tensor, groupsize: int, k: int) -> Tensor:
    """(N, K / G) group values -> (N, K / 32, 1), each block taking its group's."""
    g = groupsize or k
    return values.repeat_interleave(g // BLOCK, dim=1).unsqueeze(-1)


def _half_bytes(x: Tensor) -> Tensor:
    """(N, B, 1) float -> (N, B, 2) uint8: the fp16 value's little-endian bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def pack_q8_0(w: Tensor, groupsize: int) -> Tensor:
    """w (N, K) float, K a multiple of 32 and of groupsize -> Q8_0 blocks (N, K / 32 * 34) uint8."""
    n, k = w.shape
    scale = _groups(w, groupsize).abs().amax(-1) / 127  # (N, K / G)
    d = _per_block(scale, groupsize, k).to(torch.float16).float()  # the stored scale
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    q = torch.where(d > 0, blocks / d, torch.zeros_like(blocks)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([_half_bytes(d), q.view(torch.uint8)], dim=-1).reshape(n, -1)


def _pack_q4_0(w: Tensor, groupsize: int) -> Tensor:
    from torchchat.kernels.cpu import pack_q4_0

    return pack_q4_0(w, groupsize)


def _pack_q4_1(w: Tensor, groupsize: int) -> Tensor:
    from torchchat.kernels.cpu import pack_q4_1

    return pack_q4_1(w, groupsize)


_PACKERS = {8: pack_q8_0, 2: _pack_q4_0, 3: _pack_q4_1}


def packs(key: str, bitwidth: int | None, groupsize: int, k: int) -> bool:
    """Whether a recipe scheme on a weight of row length `k` is stored in GGML blocks."""
    if key not in RECIPE_TYPES or (key == "linear:int8" and bitwidth != 8):
        return False
    return k % BLOCK == 0 and (groupsize == 0 or (groupsize % BLOCK == 0 and k % groupsize == 0))


def pack_linears(model: torch.nn.Module, key: str, groupsize: int, names: set[str]) -> None:
    """Replace the nn.Linear modules named in `names` by PackedLinear of the recipe's format, freeing
    each float weight as its packed copy is made. A tied output (sharing the embedding's weight) is
    packed on its own: the embedding stays a float lookup table."""
    from torchchat.model.packed import PackedLinear, _set_submodule

    qtype = RECIPE_TYPES[key]
    for name in names:
        linear = model.get_submodule(name)
        with torch.no_grad():
            packed = _PACKERS[qtype](linear.weight, groupsize)
        _set_submodule(model, name, PackedLinear(linear.in_features, linear.out_features, qtype, packed, linear.bias))
