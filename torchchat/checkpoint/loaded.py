"""What every checkpoint loader takes (LoadOptions) and returns (LoadedCheckpoint).

Kept apart from detect.py, which picks the loader, so that a loader (gguf.py) can name these types
without importing the module that imports it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from torchchat.model.config import ModelConfig


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, Tensor]
    config: ModelConfig | None  # None where the file says nothing about the architecture
    format: str  # "pt" | "llama2c" | "hf" | "meta" | "gguf"
    tokenizer: object | None = None  # a Tokenizer, for formats that carry one (GGUF)
    packed: dict[str, int] = field(default_factory=dict)  # weight name -> GGML type id of uint8 block tensors
    notes: list[str] = field(default_factory=list)  # one-line notices for the user (e.g. a fallback taken)


@dataclass(frozen=True)
class LoadOptions:
    """What the caller will do with the weights, for formats that can prepare them for it (GGUF:
    quantized tensors are dequantized to `dtype`, or kept 4-bit where an int4 kernel runs on `device`)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    keep_quantized: bool = False  # False whenever another quantization will be applied afterwards
    tokenizer: bool = True  # build the tokenizer a checkpoint carries (False: the caller has its own)
    packed: bool = False  # GGUF: keep block-quantized weights packed for the native CPU kernels, where they run
    # GGUF: keep block-quantized weights as their blocks where this says so for the file's config (the
    # fused CUDA path transcodes them, torchchat.kernels.gguf_transcode); no CPU kernel is needed.
    keep_blocks: Callable[[ModelConfig], bool] | None = None
