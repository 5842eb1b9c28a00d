"""Checks on a parsed GGUF model that the header walk (gguf_header.py) cannot make alone: where each
tensor's bytes lie relative to the others, and whether the metadata's numbers make sense.

A tensor offset moved into another tensor, a type changed to one of a different size, or `eps -1`
all parse and load, and the model then prints garbage with exit 0. llama.cpp's writers lay tensors
out in order, each at an aligned offset, back to back up to the alignment padding; anything else is
damage, and is refused here with one line."""
from __future__ import annotations

import math
from typing import Any

from torchchat.errors import CheckpointError


def check_tensor_layout(reader, source: str, file_size: int) -> None:
    """Tensors in declaration order, aligned, not overlapping, with no unexplained gaps, inside the file."""
    alignment = int(reader.alignment)
    base = int(reader.data_offset)
    hint = "the file is damaged; download it again"
    prev_end, prev_name = base, None
    for t in reader.tensors:
        start, n = int(t.data_offset), int(t.n_bytes)
        rel = start - base
        if rel % alignment:
            raise CheckpointError(f"{source}: tensor '{t.name}' starts at data offset {rel}, not a multiple of the "
                                  f"alignment {alignment}; {hint}")
        if start < prev_end:
            what = f"overlaps '{prev_name}'" if prev_name else "starts before the data section"
            raise CheckpointError(f"{source}: tensor '{t.name}' (bytes {rel}..{rel + n}) {what}; {hint}")
        if start - prev_end >= alignment:
            raise CheckpointError(
                f"{source}: {start - prev_end} unused bytes before tensor '{t.name}' (more than the alignment "
                f"padding): a tensor's type or shape does not match its data; {hint}"
            )
        prev_end, prev_name = start + n, t.name
    if prev_end > file_size:
        raise CheckpointError(f"{source}: tensor data ends at byte {prev_end}, past the end of the file ({file_size}); {hint}")
    if file_size - prev_end >= alignment and reader.tensors:
        raise CheckpointError(f"{source}: {file_size - prev_end} bytes after the last tensor: a tensor's type or shape "
                              f"does not match its data; {hint}")


def check_metadata_ranges(get: Any, source: str) -> None:
    """`get(key)` -> value or None. Numbers the model is built from must be finite and in range."""
    positive_floats = ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
                       "llama.rope.scaling.factor", "llama.rope.scale_linear")
    for key in positive_floats:
        v = get(key)
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise CheckpointError(f"{source}: GGUF metadata '{key}' is {v!r}; it must be a finite number > 0 "
                                  "(the file is damaged)")
    eps = get("llama.attention.layer_norm_rms_epsilon")
    if eps is not None and eps >= 1:
        raise CheckpointError(f"{source}: GGUF metadata 'llama.attention.layer_norm_rms_epsilon' is {eps}; expected a "
                              "small positive number (the file is damaged)")
    counts = {"llama.block_count": 4096, "llama.attention.head_count": 4096, "llama.attention.head_count_kv": 4096,
              "llama.embedding_length": 1 << 17, "llama.feed_forward_length": 1 << 20,
              "llama.context_length": 1 << 24, "llama.attention.key_length": 1 << 14,
              "llama.attention.value_length": 1 << 14, "llama.rope.dimension_count": 1 << 14,
              "llama.vocab_size": 1 << 23}
    for key, most in counts.items():
        v = get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= most:
            raise CheckpointError(f"{source}: GGUF metadata '{key}' is {v!r}; expected a whole number in 1..{most} "
                                  "(the file is damaged)")


def validate_gguf(reader, get, source: str, file_size: int) -> None:
    """Both checks; called by checkpoint/gguf.py before the config is built or any tensor read.
    (Shapes against the architecture are checked where the weights meet the model, in build.)"""
    check_metadata_ranges(get, source)
    check_tensor_layout(reader, source, file_size)
