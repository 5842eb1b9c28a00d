"""What the AOT Inductor and ExecuTorch runtimes share: the artifact's metadata stands in for the model
(config, context length, weight bytes), and the KV cache, compiled into the artifact, cannot grow."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from torchchat.errors import ContextLengthError, ExportError, UserInputError
from torchchat.export.metadata import ArtifactMetadata
from torchchat.model.config import ModelConfig


def read_head(path: Path, n: int, flag: str) -> bytes:
    """The first `n` bytes of an artifact, after checking it exists and is a file."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{flag}: {path} does not exist")
    if not path.is_file():
        raise UserInputError(f"{flag}: {path} is not a file")
    with path.open("rb") as f:
        return f.read(n)


class ExportedRuntime:
    """Base of the runtimes over an exported program: forward(tokens (1, S), input_pos (S,)) ->
    logits (1, S, V) float32, with S == 1 unless the artifact was exported with dynamic shapes."""

    backend = ""  # "aoti" | "executorch": what the metadata must say

    def __init__(self, path: Path, metadata: ArtifactMetadata):
        self.path = Path(path)
        self.metadata = metadata
        if metadata.backend != self.backend:
            raise ExportError(f"{path} is a {metadata.backend} artifact, not {self.backend}; pass it with the matching flag")
        self.config: ModelConfig = metadata.config.with_max_seq_len(metadata.max_seq_len)
        self.max_seq_len = metadata.max_seq_len
        self.supports_parallel_prefill = metadata.dynamic_shapes
        self.weight_bytes = metadata.weight_bytes
        self.dtype = metadata.torch_dtype
        self.device = torch.device(metadata.device)

    def setup(self, max_batch: int, max_seq: int) -> None:
        """The KV cache was sized at export (batch 1, metadata.max_seq_len positions): only check."""
        if max_batch != 1:
            raise UserInputError(f"{self.path}: exported models run one sequence at a time (batch size 1)")
        if max_seq > self.max_seq_len:
            raise ContextLengthError(
                f"{self.path} was exported for {self.max_seq_len} positions and {max_seq} were asked for; "
                f"lower --max-seq-length or re-export with --max-seq-length {max_seq}"
            )

    def _check_inputs(self, tokens: Tensor, input_pos: Tensor) -> None:
        seq = tokens.size(1)
        if seq != 1 and not self.metadata.dynamic_shapes:
            raise ExportError(f"{self.path} was exported without dynamic shapes: it takes one token per call, got {seq}")
        if seq > self.max_seq_len:
            raise ContextLengthError(f"{seq} tokens do not fit the {self.max_seq_len} positions {self.path} holds")
