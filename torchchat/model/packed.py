"""Linear and embedding layers whose weights stay in llama.cpp's (GGUF) block formats, run by the
native CPU kernels of torchchat.kernels.cpu (custom ops `torchchat_cpu::ggml_linear` /
`ggml_embedding`, with fake kernels, so the same modules run eager, under `--compile` and in AOT
Inductor packages).

A packed weight is a uint8 parameter of shape (rows, row_bytes) holding the blocks byte for byte as the
GGUF file stores them (or as torchchat.quantize packed them from a float weight): it is read, never
expanded. `Module.to(dtype)` leaves uint8 tensors alone, so a packed model casts its float parts (norms,
biases) like any other; the embedding's output dtype follows a zero-size float buffer cast with them.

The swap happens at one boundary, on the meta device before the weights are assigned
(`install_packed`, called by torchchat.build for GGUF files), or on a built model for the recipes
(`pack_linear`, called by torchchat.quantize)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from torchchat.kernels.cpu.formats import NAMES, row_bytes

# The formats and their sizes are the kernels' (torchchat/kernels/cpu/formats.py: imports torch only).
GGML_IDS: Mapping[str, int] = {name: qtype for qtype, name in NAMES.items()}


def _packed_parameter(rows: int, k: int, qtype: int, data: Tensor | None) -> nn.Parameter:
    shape = (rows, row_bytes(qtype, k))
    if data is None:
        data = torch.empty(shape, dtype=torch.uint8, device="meta")
    elif data.dtype != torch.uint8 or tuple(data.shape) != shape:
        raise ValueError(f"packed {NAMES[qtype]} weight must be uint8 {shape}, got {data.dtype} {tuple(data.shape)}")
    return nn.Parameter(data, requires_grad=False)


class PackedLinear(nn.Module):
    """y = x @ W.T (+ bias), W (out_features, in_features) held as GGML blocks of type `qtype`.
    x: (..., in_features) fp32 or bf16 -> (..., out_features) in x's dtype."""

    def __init__(self, in_features: int, out_features: int, qtype: int, weight: Tensor | None = None,
                 bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.weight = _packed_parameter(out_features, in_features, qtype, weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.torchchat_cpu.ggml_linear(x, self.weight, self.qtype, self.out_features, self.in_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {NAMES[self.qtype]}"


class PackedEmbedding(nn.Module):
    """Rows of a table (num_embeddings, embedding_dim) held as GGML blocks, expanded per looked-up id.
    ids: (B, S) int64 -> (B, S, embedding_dim) in the model's float dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int, weight: Tensor | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, qtype
        self.weight = _packed_parameter(num_embeddings, embedding_dim, qtype, weight)
        # Follows `model.to(dtype)` like the float weights do; the op reads only its dtype. Made on the
        # CPU even under a meta device context: a meta tensor cannot be moved to a device later.
        self.register_buffer("dtype_probe", torch.empty(0, device="cpu"), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return torch.ops.torchchat_cpu.ggml_embedding(self.weight, ids, self.qtype, self.embedding_dim, self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {NAMES[self.qtype]}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def install_packed(model: nn.Module, packed: Mapping[str, int]) -> None:
    """Swap, on a (meta-initialised) Transformer, the nn.Linear / nn.Embedding owning each weight named
    in `packed` (parameter name -> GGML type id) for its packed counterpart, so that `load_state_dict`
    assigns the uint8 block tensors. A tied output shares the packed embedding table: it becomes a
    PackedLinear of the embedding's type (the caller ties the two weights after loading)."""
    for name, qtype in packed.items():
        module_name = name.removesuffix(".weight")
        old = model.get_submodule(module_name)
        if isinstance(old, nn.Embedding):
            new: nn.Module = PackedEmbedding(old.num_embeddings, old.embedding_dim, qtype)
        elif isinstance(old, nn.Linear):
            new = PackedLinear(old.in_features, old.out_features, qtype)
            if old.bias is not None:
                new.bias = old.bias
        else:
            raise TypeError(f"{name}: a packed weight belongs to an nn.Linear or nn.Embedding, not {type(old).__name__}")
        _set_submodule(model, module_name, new)
    if model.config.tie_embeddings and "tok_embeddings.weight" in packed:
        emb = model.tok_embeddings
        model.output = PackedLinear(emb.embedding_dim, emb.num_embeddings, emb.qtype)


def stack_packed(linears: list[PackedLinear]) -> PackedLinear | None:
    """One PackedLinear computing the given ones' outputs, concatenated (rows appended: a block never
    spans rows), or None where their types or row lengths differ (e.g. a Q4_K_M file's Q6_K wv beside
    Q4_K wq/wk). The inputs' storage is released as the stacked copy is made."""
    first = linears[0]
    if any(m.qtype != first.qtype or m.in_features != first.in_features for m in linears):
        return None
    if any((m.bias is None) != (first.bias is None) for m in linears):
        return None
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None if first.bias is None else torch.cat([m.bias.detach() for m in linears])
    return PackedLinear(first.in_features, weight.size(0), first.qtype, weight, bias)


def interleave_packed(model: nn.Module) -> int:
    """Store every packed weight that has a row-interleaved layout (every GGUF type the kernels run, with a
    multiple of 16 rows) in it, in place: the kernels run it 1.5-2.5x faster (one lane per row, one
    sequential stream per 16 rows; bench/cpu_kernels.py). A tied table is converted once, and the
    embedding and the output keep sharing it. Returns how many weights were converted."""
    from torchchat.kernels import cpu

    # Without VNNI (the 256-bit path), Q8_0's signed codes need two sign ops per 4-byte dot, and its
    # interleaved GEMV came out 15-20% slower than the row layout's (stories110M linears, 1 thread:
    # 7.9-8.3 ms against 6.5-6.7; bench/cpu_kernels.py with TORCHCHAT_CPU_ISA=avx2): keep its rows.
    keep_rows = {cpu.Q8_0} if cpu.isa() != "avx512vnni" else set()
    by_storage: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if is_packed(module) and module.weight.device.type == "cpu":
            by_storage.setdefault(id(module.weight), []).append(module)
    done = 0
    for modules in by_storage.values():
        first = modules[0]
        k = first.in_features if isinstance(first, PackedLinear) else first.embedding_dim
        qtype = first.qtype
        if qtype not in cpu.X16_BLOCK_BYTES or qtype in keep_rows or first.weight.size(0) % 16:
            continue
        weight = nn.Parameter(cpu.interleave(first.weight.detach(), qtype, k), requires_grad=False)
        for module in modules:
            module.weight = weight
            module.qtype = qtype | cpu.X16
        done += 1
    return done


def is_packed(module: nn.Module) -> bool:
    return isinstance(module, (PackedLinear, PackedEmbedding))


def has_packed(model: nn.Module) -> bool:
    return any(is_packed(m) for m in model.modules())


def kernels_unavailable() -> str | None:
    """None where the native CPU kernels run in this process (building them on first use, then
    cached), else why not, in a few words."""
    try:
        from torchchat.kernels import cpu
    except ImportError as e:
        return f"torchchat.kernels.cpu cannot be imported ({e})"
    if not cpu.available():
        why = getattr(cpu, "unavailable_reason", None)
        return why() if callable(why) else "they could not be built here (no C++ compiler?)"
    return None
