"""torchchat's native CPU kernels for GGUF block-quantized weights (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K).

Weights stay packed exactly as in the .gguf file (see formats.py). Each call quantizes the activation
rows to int8 per 32 values (per 256 for an interleaved K-quant prefill of 8+ rows, as llama.cpp's Q8_K)
and runs integer dot products against the packed blocks (AVX2, AVX-512 or
AVX-512 VNNI, chosen at run time; a scalar path elsewhere), threads splitting the output rows.

    from torchchat.kernels import cpu
    if cpu.available():
        y = cpu.linear(x, w_packed, cpu.Q4_0, n, k)        # x (..., k) fp32/bf16 -> (..., n)

The operators are `torch.ops.torchchat_cpu.ggml_linear(x, w, qtype, n, k)` and
`torch.ops.torchchat_cpu.ggml_embedding(w, ids, qtype, k, dtype)`, with fake implementations, so
torch.compile(fullgraph=True), torch.export and AOT Inductor packages call them. A process that
loads such a package must have called `ensure_loaded()` (or `available()`) first.

Nothing is built or loaded at import: the first call to available()/linear()/... compiles the C++
once per machine into ${TORCHCHAT_CACHE:-~/.cache/torchchat}/kernels/<hash>/ (a note on stderr), later
processes just load it. `TORCHCHAT_CPU_ISA=scalar|avx2|avx512|avx512vnni` caps the instruction set
(the best supported path at or below it is used)."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor

from torchchat.errors import MissingDependencyError
from torchchat.kernels.cpu.formats import (  # noqa: F401  (re-exported API)
    NAMES,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_0,
    SUPPORTED_QTYPES,
    X16,
    X16_BLOCK_BYTES,
    pack_q4_0,
    pack_q4_0_codes,
    pack_q4_1,
    pack_q4_1_codes,
    pack_q8_0,
    row_bytes,
)

ISAS = ("scalar", "avx2", "avx512", "avx512vnni")


class CpuKernelsUnavailable(MissingDependencyError):
    """The CPU kernels could not be built or loaded here (the message says why); callers fall back."""


_lock = threading.Lock()
_loaded = False
_reason: str | None = None
_path: Path | None = None


def _register_fakes() -> None:
    # Shapes only, written with the tensors' (possibly symbolic) sizes, for torch.compile and export.
    @torch.library.register_fake("torchchat_cpu::ggml_linear")
    def _linear_fake(x: Tensor, w: Tensor, qtype: int, n: int, k: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("torchchat_cpu::decode_attention")
    def _attention_fake(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, window: int) -> Tensor:
        return torch.empty_like(q)

    @torch.library.register_fake("torchchat_cpu::rms_norm")
    def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("torchchat_cpu::rope")
    def _rope_fake(x: Tensor, table: Tensor, rope_dim: int) -> Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("torchchat_cpu::kv_update")
    def _kv_update_fake(k: Tensor, v: Tensor, table: Tensor, rope_dim: int, pos: Tensor, k_cache: Tensor,
                        v_cache: Tensor, row: int) -> None:
        return None

    @torch.library.register_fake("torchchat_cpu::silu_mul")
    def _silu_mul_fake(x: Tensor) -> Tensor:
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake("torchchat_cpu::ggml_embedding")
    def _embedding_fake(w: Tensor, ids: Tensor, qtype: int, k: int, dtype: torch.dtype) -> Tensor:
        return w.new_empty((*ids.shape, k), dtype=dtype)


def interleave(w: Tensor, qtype: int, k: int) -> Tensor:
    """A weight (n, row_bytes) in the file's layout of `qtype` (any supported GGUF type), n a multiple
    of 16, in the row-interleaved layout of type `qtype | X16`, which the kernels run faster (one
    lane per row, one sequential stream per 16 rows). A new tensor; `deinterleave` undoes it."""
    ensure_loaded()
    return torch.ops.torchchat_cpu.ggml_interleave(w, qtype, k)


def deinterleave(w: Tensor, qtype: int, k: int) -> Tensor:
    """An interleaved weight (type `qtype`, X16 set) back in the file's layout, byte for byte."""
    ensure_loaded()
    return torch.ops.torchchat_cpu.ggml_deinterleave(w, qtype, k)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, scale: float, window: int = 0) -> Tensor:
    """One query per sequence, q (B, H, 1, D), against the caches k, v (B, H_kv, S_max, D) over the
    positions the mask allows: [0, pos], or the last `window` of them (sliding-window layers). pos:
    (1,) shared or (B,) / (B, 1) per row. Reads only those positions, not the whole cache."""
    ensure_loaded()
    return torch.ops.torchchat_cpu.decode_attention(q, k, v, pos, scale, window)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm.forward in one pass: (x * rsqrt(mean(x^2) + eps)) in float32, rounded to x's dtype, times
    weight (x's dtype). x (..., D); returns a contiguous tensor of x's shape and dtype."""
    ensure_loaded()
    return torch.ops.torchchat_cpu.rms_norm(x, weight, eps)


def rope(x: Tensor, table: Tensor, rope_dim: int) -> Tensor:
    """apply_rope on the first `rope_dim` values of each head (the rest copied): x (B, S, H, D) with a
    contiguous head dimension; table (S, rope_dim/2, 2) or (B, S, rope_dim/2, 2) float32. Returns a
    contiguous (B, S, H, D) in x's dtype."""
    ensure_loaded()
    return torch.ops.torchchat_cpu.rope(x, table, rope_dim)


def kv_update(k: Tensor, v: Tensor, table: Tensor, rope_dim: int, pos: Tensor, k_cache: Tensor, v_cache: Tensor,
              row: int = 0) -> None:
    """Rotate the keys (rope_dim 0: not at all) and write keys and values into the caches in place:
    k, v (B, S, H_kv, D); pos (S,) or (B, S); caches (B_max, H_kv, S_max, D), rows [row, row + B)."""
    ensure_loaded()
    torch.ops.torchchat_cpu.kv_update(k, v, table, rope_dim, pos, k_cache, v_cache, row)


def silu_mul(x: Tensor) -> Tensor:
    """SwiGLU on the stacked w1|w3 output: x (..., 2H) -> silu(x[..., :H]) * x[..., H:], (..., H)."""
    ensure_loaded()
    return torch.ops.torchchat_cpu.silu_mul(x)


def _try_load() -> None:
    global _loaded, _reason, _path
    with _lock:
        if _loaded or _reason is not None:
            return
        from torchchat.kernels.cpu import _build

        try:
            path, already = _build.build()
            if not already:
                torch.ops.load_library(str(path))
            _register_fakes()
        except _build.BuildError as e:
            _reason = str(e)
            return
        except OSError as e:  # dlopen of a cached library failed (e.g. a foreign or damaged file)
            _reason = f"loading {path} failed: {e} (delete that folder to rebuild)"
            return
        _path = path
        _loaded = True


def available() -> bool:
    """True when the kernels are built (building them on first use) and loaded in this process."""
    if not _loaded:
        _try_load()
    return _loaded


def unavailable_reason() -> str | None:
    """Why available() is False (compiler missing, build error, ...); None when it is True."""
    available()
    return _reason


def ensure_loaded() -> None:
    """Load the kernels or raise CpuKernelsUnavailable naming the reason."""
    if not available():
        raise CpuKernelsUnavailable(
            f"torchchat's CPU kernels are unavailable: {_reason}. Rebuild with "
            "`python3 -m torchchat.kernels.cpu.build`"
        )


def library_path() -> Path:
    ensure_loaded()
    assert _path is not None
    return _path


def _isa_info() -> tuple[str, list[str]]:
    ensure_loaded()
    chosen, supported = torch.ops.torchchat_cpu._isa_info().split(";")
    return chosen, supported.split(",")


def isa() -> str:
    """The instruction-set path the kernels run: scalar, avx2, avx512 or avx512vnni."""
    return _isa_info()[0]


def supported_isas() -> list[str]:
    """Every path this CPU and OS can run, lowest first."""
    return _isa_info()[1]


def set_isa(name: str | None) -> str:
    """Use the best supported path at or below `name` in this process (tests, benchmarks); None
    restores the default (TORCHCHAT_CPU_ISA or the best). Returns the path now chosen."""
    if name is not None and name not in ISAS:
        raise ValueError(f"unknown ISA {name!r}; valid: {', '.join(ISAS)}")
    ensure_loaded()
    return torch.ops.torchchat_cpu._set_isa(name or "").split(";")[0]


def set_prefill(mode: str | None) -> str:
    """How ggml_linear runs 16 or more activation rows: "int8" (the integer kernels) or "bf16"
    (weights dequantized slice by slice into a scratch buffer, then torch's dense bf16 GEMM). None
    restores the default (TORCHCHAT_CPU_PREFILL, else automatic: bf16 for weights in the file's row
    layout where the CPU has AVX512_BF16, on which that GEMM beats the row-layout kernels about twice,
    and int8 for the interleaved layouts, whose kernels beat it). Returns the mode now used."""
    if mode is not None and mode not in ("int8", "bf16"):
        raise ValueError(f"unknown prefill mode {mode!r}; valid: int8, bf16")
    ensure_loaded()
    return torch.ops.torchchat_cpu._set_prefill(mode or "")


def prefill_mode() -> str:
    """The prefill mode in use (see set_prefill)."""
    ensure_loaded()
    return torch.ops.torchchat_cpu._prefill_mode()


def linear(x: Tensor, w: Tensor, qtype: int, n: int, k: int) -> Tensor:
    """y = x @ W.T for a GGUF-packed W. x (..., k) float32 or bfloat16; w uint8 (n, row_bytes(qtype, k)).
    Returns (..., n) in x's dtype. Bias, if any, is the caller's."""
    if not _loaded:
        ensure_loaded()
    return torch.ops.torchchat_cpu.ggml_linear(x, w, qtype, n, k)


def embedding(w: Tensor, ids: Tensor, qtype: int, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows `ids` of a GGUF-packed table w (vocab, row_bytes(qtype, k)), dequantized: ids.shape + (k,)
    in `dtype`. Only the looked-up rows are decoded."""
    if not _loaded:
        ensure_loaded()
    return torch.ops.torchchat_cpu.ggml_embedding(w, ids, qtype, k, dtype)
