"""GGUF files (llama.cpp): llama-architecture models, read with the `gguf` package.

The metadata gives the architecture (`llama.*` keys, including rope.freq_base, Llama 3 rope scaling and
the context length) and the tokenizer (`tokenizer.ggml.*`, built by torchchat.tokenizer.gguf), so a
GGUF file is a whole model. Tensor names map onto ours below; llama.cpp's converter already stores q/k
in the adjacent-pair RoPE layout our Transformer uses, so nothing is permuted. GGUF lists dimensions
innermost first; the gguf package hands tensors over in torch order.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from torchchat.checkpoint import gguf_arch
from torchchat.checkpoint.loaded import LoadedCheckpoint, LoadOptions
from torchchat.checkpoint.gguf_header import check_gguf
from torchchat.checkpoint.gguf_packed import read_blocks
from torchchat.checkpoint.gguf_tensors import SUPPORTED_TYPES, to_dense, unpack_q4_0
from torchchat.checkpoint.gguf_validate import validate_gguf
from torchchat.errors import CheckpointError, MissingDependencyError
from torchchat.model.config import ModelConfig, RopeScaling

_LAYER = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
# Weights read by F.linear, which an int4 tensor can stand in for (the embedding is a lookup).
_LINEAR_WEIGHTS = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "output.weight",
)
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ rope scaling, stored as per-frequency divisors


def our_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> our parameter name, or None if it is not a llama weight we know."""
    return gguf_arch.map_name(gguf_name, _LAYER)


class _Metadata:
    """Typed access to a reader's key/value metadata, with errors that name the key."""

    def __init__(self, reader, source: str):
        self.reader, self.source = reader, source

    def get(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise CheckpointError(f"{self.source}: corrupted GGUF metadata '{key}' ({e})") from e

    def number(self, key: str, default: float | int | None = None, integer: bool = True) -> Any:
        value = self.get(key)
        if value is None:
            if default is None:
                raise CheckpointError(f"{self.source}: GGUF metadata '{key}' is missing; the file does not describe a llama model")
            return default
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise CheckpointError(f"{self.source}: GGUF metadata '{key}' is {value!r}; expected a single number")
        return value


def llama3_scaling_from_factors(factors: np.ndarray, base: float, head_dim: int, original_ctx: int) -> RopeScaling:
    """Recover Llama 3 rope scaling from llama.cpp's `rope_freqs` tensor (one divisor per frequency).

    The rule (Llama 3.1): divisor 1 where the wavelength is below original_ctx / high_freq_factor,
    `factor` above original_ctx / low_freq_factor, and 1 / ((1 - s) / factor + s) in between, with s
    linear in original_ctx / wavelength. Only the ratios low : high : original_ctx matter, so
    original_ctx is taken from the metadata (8192 for Llama 3) and the two factors fitted to the
    blended frequencies; the fit is then checked against every divisor."""
    factors = np.asarray(factors, dtype=np.float64)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64)[: head_dim // 2] / head_dim))
    if factors.shape != freqs.shape:
        raise CheckpointError(f"rope_freqs has {factors.size} values; head_dim {head_dim} needs {freqs.size}")
    factor = float(factors.max())
    wavelen = 2 * math.pi / freqs
    blended = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 + 1e-6 or blended.sum() < 2:
        raise CheckpointError(
            "rope_freqs does not follow the Llama 3 scaling rule (too few blended frequencies to fit it)"
        )
    s = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)  # the blend weight of each blended frequency
    slope, intercept = np.polyfit(1 / wavelen[blended], s, 1)  # s = slope / wavelen + intercept
    width = original_ctx / slope  # high_freq_factor - low_freq_factor
    low = -intercept * width
    scaling = RopeScaling(factor=factor, low_freq_factor=float(low), high_freq_factor=float(low + width),
                          original_max_position_embeddings=original_ctx)
    from torchchat.model.rope import scaled_frequencies

    rebuilt = freqs / scaled_frequencies(torch.from_numpy(freqs), scaling).numpy()
    if not np.allclose(rebuilt, factors, rtol=1e-4, atol=0):
        raise CheckpointError("rope_freqs does not follow the Llama 3 scaling rule; this rope scaling is not supported")
    return scaling


def config_from_gguf(meta: _Metadata, tensors: dict[str, Any]) -> ModelConfig:
    """ModelConfig from `llama.*` metadata and the tensors' shapes."""
    source = meta.source
    arch = meta.get("general.architecture")
    if arch in gguf_arch.ARCHITECTURES:
        return gguf_arch.config_from_gguf_arch(
            meta, tensors, arch, lambda name: to_dense(tensors[name], torch.float32, source).float())
    if arch != "llama":
        raise CheckpointError(
            f"{source}: GGUF architecture '{arch}' is not supported; torchchat loads llama-architecture GGUF files "
            f"(Llama 2/3, Mistral, CodeLlama) and {', '.join(gguf_arch.ARCHITECTURES)}"
        )
    experts = meta.get("llama.expert_count")
    if experts:
        raise CheckpointError(f"{source}: mixture-of-experts GGUF models (llama.expert_count={experts}) are not supported")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{source}: GGUF file has no token_embd.weight")
    dim = meta.number("llama.embedding_length")
    n_heads = meta.number("llama.attention.head_count")
    head_dim = meta.number("llama.attention.key_length", dim // n_heads if n_heads else 0)
    value_dim = meta.number("llama.attention.value_length", head_dim)
    rope_dims = meta.number("llama.rope.dimension_count", head_dim)
    if value_dim != head_dim or rope_dims != head_dim:
        raise CheckpointError(
            f"{source}: key/value/rope dimensions {head_dim}/{value_dim}/{rope_dims} differ; partial rotary or "
            "asymmetric heads are not supported"
        )
    base = float(meta.number("llama.rope.freq_base", 10000.0, integer=False))
    context = meta.number("llama.context_length", 2048)
    scaling_type = meta.get("llama.rope.scaling.type")
    linear_scale = meta.get("llama.rope.scale_linear")
    if scaling_type not in (None, "none") or linear_scale not in (None, 1.0):
        raise CheckpointError(
            f"{source}: rope scaling '{scaling_type or 'linear'}' is not supported (plain RoPE and Llama 3 scaling are)"
        )
    scaling = None
    if _ROPE_FREQS in tensors:
        original = meta.number("llama.rope.scaling.original_context_length", 8192)
        factors = to_dense(tensors[_ROPE_FREQS], torch.float32, source).float().numpy()
        try:
            scaling = llama3_scaling_from_factors(factors, base, head_dim, original)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF dims are innermost first: rows come last
    declared_vocab = meta.get("llama.vocab_size")
    if declared_vocab is not None and declared_vocab != vocab:
        raise CheckpointError(f"{source}: llama.vocab_size is {declared_vocab} but token_embd has {vocab} rows")
    return ModelConfig(
        dim=dim,
        n_layers=meta.number("llama.block_count"),
        n_heads=n_heads,
        n_kv_heads=meta.number("llama.attention.head_count_kv", n_heads),
        head_dim=head_dim,
        vocab_size=vocab,
        hidden_dim=meta.number("llama.feed_forward_length"),
        norm_eps=float(meta.number("llama.attention.layer_norm_rms_epsilon", 1e-5, integer=False)),
        rope_base=base,
        rope_scaling=scaling,
        max_seq_len=context,
        tie_embeddings="output.weight" not in tensors,
    )


def _tokenizer(reader, source: str):
    from torchchat.tokenizer.gguf import tokenizer_from_gguf

    try:
        return tokenizer_from_gguf(reader)
    except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        # Values the header walk cannot judge (a token type out of range, a broken piece) in a damaged file.
        raise CheckpointError(f"{source}: corrupted tokenizer metadata ({e}); download the file again") from e


def load_gguf(path: Path, options: LoadOptions | None = None) -> LoadedCheckpoint:
    """A llama-architecture GGUF file -> state dict (our names), config and tokenizer.

    F32/F16/BF16 tensors are memory-mapped views; quantized ones are dequantized to `options.dtype`, except
    that with `options.keep_quantized`: with `options.packed` (CPU) Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K
    linear and embedding weights stay in their blocks for the native kernels (checkpoint/gguf_packed.py,
    named in the result's `packed`), and so they do where `options.keep_blocks` accepts the file's
    config (for the fused CUDA path to transcode), else Q4_0 linear weights stay 4-bit where a torchao
    int4 kernel runs (checkpoint/gguf_int4.py)."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader
    except ImportError as e:
        raise MissingDependencyError("reading GGUF files needs the gguf package: pip install gguf==0.19.0") from e
    from torchchat.checkpoint.gguf_int4 import int4_kernel_runs, int4_weight

    path = Path(path)
    options = options or LoadOptions()
    source = str(path)
    if check_gguf(path) == 0:
        raise CheckpointError(
            f"{source}: this GGUF file holds no tensors (a vocabulary-only file); it can be a --tokenizer-path, not a model"
        )
    try:
        reader = GGUFReader(path, "c")
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError) as e:
        raise CheckpointError(f"{source}: corrupted GGUF file ({e}); download it again") from e
    tensors = {t.name: t for t in reader.tensors}
    unsupported = [(n, t.tensor_type.name) for n, t in tensors.items() if t.tensor_type.name not in SUPPORTED_TYPES]
    if unsupported:
        kinds = sorted({k for _, k in unsupported})
        raise CheckpointError(
            f"{source}: tensor type(s) {', '.join(kinds)} (e.g. '{unsupported[0][0]}') are not supported; torchchat "
            f"loads {', '.join(SUPPORTED_TYPES)}"
        )
    arch = _Metadata(reader, source).get("general.architecture")
    name_of, skipped = our_name, (_ROPE_FREQS,)
    if arch in gguf_arch.ARCHITECTURES:
        name_of, skipped = gguf_arch.our_name, gguf_arch.ROPE_FACTORS  # LongRoPE factors go into the config
    unknown = [n for n in tensors if n not in skipped and name_of(n) is None]
    if unknown:
        shown = ", ".join(unknown[:6]) + (" ..." if len(unknown) > 6 else "")
        raise CheckpointError(f"{source}: unknown GGUF tensor name(s) {shown} ({len(unknown)} in all)")
    validate_gguf(reader, _Metadata(reader, source).get, source, path.stat().st_size)  # checkpoint/gguf_validate.py
    config = config_from_gguf(_Metadata(reader, source), tensors)

    packed, notes = _packed_plan(tensors, options, name_of, config)
    keep_int4 = not packed and options.keep_quantized and int4_kernel_runs(options.device, options.dtype)
    state: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name in skipped:
            continue
        ours = name_of(name)
        if ours in packed:
            state[ours] = read_blocks(path, tensor)
        elif (keep_int4 and tensor.tensor_type == GGMLQuantizationType.Q4_0 and ours.endswith(_LINEAR_WEIGHTS)
                and not gguf_arch.needs_relayout(ours, arch)):
            state[ours] = int4_weight(*unpack_q4_0(tensor), options.device, options.dtype)
        else:
            state[ours] = to_dense(tensor, options.dtype, source)
    if arch in gguf_arch.ARCHITECTURES:
        # Packed tensors move with their rows: (rows, row bytes) blocks split and permute like float rows.
        state = gguf_arch.to_runtime_layout(state, config, arch)
        packed = gguf_arch.runtime_packed(packed, arch)
    has_vocab = reader.fields.get("tokenizer.ggml.model") is not None
    tokenizer = _tokenizer(reader, source) if options.tokenizer and has_vocab else None
    return LoadedCheckpoint(state, config, "gguf", tokenizer, packed=packed, notes=notes)


def _packed_plan(tensors: dict[str, Any], options: LoadOptions, name_of: Callable[[str], str | None],
                 config: ModelConfig) -> tuple[dict[str, int], list[str]]:
    """(our weight name -> GGML type id of each tensor kept packed, notes). Nothing stays packed unless
    the caller asked (no --quantize of its own) for the CPU, where the native kernels must run here (where
    they do not, one note says so and the weights load as before), or through `keep_blocks` for the
    fused CUDA path. Tensors the architecture permutes or splits at load by rows (checkpoint/gguf_arch.py:
    half-split q/k, Phi-3's fused qkv and gate|up) stay packed: a block never spans two rows, so the
    same row permutation serves blocks and floats."""
    from torchchat.checkpoint.gguf_packed import packable
    from torchchat.model.packed import GGML_IDS, kernels_unavailable

    fused = options.keep_blocks is not None and options.keep_quantized and options.keep_blocks(config)
    if not (fused or (options.packed and options.keep_quantized)):
        return {}, []
    packed = {}
    for name, tensor in tensors.items():
        ours = name_of(name)
        if ours is not None and packable(tensor.tensor_type.name, ours):
            packed[ours] = GGML_IDS[tensor.tensor_type.name]
    if not packed or fused:
        return packed, []
    reason = kernels_unavailable()
    if reason is not None:
        return {}, [f"native CPU kernels unavailable ({reason}): GGUF quantized weights are dequantized"]
    return packed, []
