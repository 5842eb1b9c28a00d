"""The Runtime protocol and its eager implementation."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from torchchat.model.config import ModelConfig


class Runtime(Protocol):
    config: ModelConfig
    device: torch.device
    max_seq_len: int  # the most positions setup() may ask for
    supports_parallel_prefill: bool  # False: prompts are fed one token at a time

    def setup(self, max_batch: int, max_seq: int) -> None:
        """Make room for `max_batch` rows and `max_seq` positions (KV cache, RoPE table, mask)."""
        ...

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens: (B, S) int64, input_pos: (S,) int64 -> logits (B, S, V) float32."""
        ...


class EagerRuntime:
    """A Transformer in this process; `forward` may be wrapped by torch.compile in the steps."""

    supports_parallel_prefill = True
    # Takes (B, S) positions and a cache `row` (torchchat.generation.batch).
    supports_batching = True
    graph_key = None  # see torchchat.generation.steps.Steps
    # The position the batched engine gives the rows of a decode bucket that hold no sequence; None:
    # the last cache position, which no sequence writes.
    idle_position: int | None = None

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config: ModelConfig = model.config
        self.device = model.norm.weight.device
        self.max_seq_len = model.config.max_seq_len
        if getattr(model, "fused_kernels", False):
            # The fused model (torchchat.kernels) is captured into CUDA graphs as it is; a capture
            # holds the caches' addresses, which change only when their size does (the input
            # shapes, one per batch bucket, are the other half of a graph's identity: CudaGraphStep).
            self.graph_key = lambda: (model.max_batch, model.max_seq)
            # Its attention kernel skips rows at a negative position: an idle row then costs no
            # attention over a whole cache row (at the last position it would read all of it).
            self.idle_position = -1

    def setup(self, max_batch: int, max_seq: int) -> None:
        from torchchat.model.params_check import check_caches_fit

        weight = self.model.norm.weight
        check_caches_fit(self.model.config, max_batch, max_seq, weight.element_size(), str(weight.device))
        self.model.setup_caches(max_batch, max_seq)

    def forward(self, tokens: Tensor, input_pos: Tensor, row: int = 0) -> Tensor:
        return self.model(tokens, input_pos, row) if row else self.model(tokens, input_pos)

    def forward_last(self, tokens: Tensor, input_pos: Tensor, row: int = 0, last_index: Tensor | None = None) -> Tensor:
        """`forward`'s logits for the last position only, (B, 1, V): the output matrix multiplies one
        row instead of S (what a prefill samples from). `last_index` (B,): each row's own last
        position (right-padded prompts of several sequences, see Transformer.forward)."""
        if last_index is None:
            return self.model(tokens, input_pos, row, last_only=True)
        return self.model(tokens, input_pos, row, last_only=True, last_index=last_index)
