"""torchchat's own CUDA kernels (Triton) and the fused decode path built on them.

On a CUDA device, `build_model` replaces each decoder layer by a fused block (stacked q|k|v and w1|w3
projections, RMSNorm, RoPE, KV-cache write, SwiGLU and residual adds folded into five kernels per
layer), optionally storing the linear weights as int8 or int4 (`--quantize` linear:int8 / linear:int4).
With `--compile` the whole decode step (forward and sampling) is then captured as one CUDA graph.

This package's top level imports no triton: the submodules that do (gemv, attention, norm, modules,
transform) are imported only once the fused path has been chosen, so CPU installs never need triton.
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import torch

from torchchat.kernels.formats import LinearQuant
from torchchat.model.config import ModelConfig


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def linear_quant(plan: Any) -> tuple[LinearQuant | None, Any]:
    """Split a torchchat.quantize.QuantPlan into the linear quantization the fused kernels do
    themselves and the rest of the plan (embedding quantization, left to torchao), which is None when
    nothing remains. Raises ValueError when the plan's linear scheme has no fused kernel."""
    scheme = getattr(plan, "linear", None) if plan is not None else None
    rest = plan
    quant = None
    if scheme is not None:
        if scheme.key == "linear:int8" and scheme.bitwidth == 8:
            quant = LinearQuant("int8", scheme.groupsize)
        elif scheme.key == "linear:int4":
            quant = LinearQuant("int4", scheme.groupsize)
        else:
            raise ValueError(f"{scheme.key} bitwidth {scheme.bitwidth} has no fused CUDA kernel")
        rest = replace(plan, linear=None)
    if rest is not None and not getattr(rest, "schemes", ()):
        rest = None
    return quant, rest


def unsupported_reason(config: ModelConfig, dtype: torch.dtype, plan: Any) -> str | None:
    """Why the fused CUDA path cannot run this model, or None when it can."""
    if not triton_available():
        return "triton is not installed"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype} is not supported"
    if config.attention_bias or config.mlp_bias or config.qkv_bias:
        return "the model has linear biases"
    family = [name for name, on in (
        ("q/k norms", config.qk_norm), ("partial rotary", config.rotary_dim != config.head_dim),
        ("GeGLU", config.activation != "silu"), ("post-norms", config.sandwich_norms),
        ("soft-capping", config.attn_softcap is not None or config.final_softcap is not None),
        ("sliding-window layers", bool(config.sliding_layers)), ("layers without RoPE", bool(config.nope_layers)),
        ("per-layer RoPE bases", config.rope_local_base is not None),
        ("LongRoPE/linear RoPE scaling", config.rope_scaling is not None and config.rope_scaling.rope_type != "llama3"),
    ) if on]
    if family:
        return f"the fused kernels implement Llama's block only (this model has {', '.join(family)})"
    hd = config.head_dim
    if hd < 2 or hd & (hd - 1):
        return f"head_dim {hd} is not a power of two"
    try:
        linear_quant(plan)
    except ValueError as e:
        return str(e)
    return None
