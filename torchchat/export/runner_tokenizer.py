"""The tokenizer file the C++ runners read for a model whose vocabulary came from a GGUF file.

Such a model's tokenizer has kind "gguf": it was rebuilt from the GGUF's `tokenizer.ggml.*` metadata
(torchchat.tokenizer.gguf). The runners do not parse GGUF; for a SentencePiece vocabulary (GGUF
tokenizer model "llama") the export writes the very ModelProto the Python loader built, as
`<artifact>.tokenizer.model` beside the artifact, and the runner reads it with libsentencepiece. A
byte-level BPE vocabulary (GGUF "gpt2", Llama 3) has no such file: the runner takes Llama 3's own
tokenizer.model with `-l tiktoken`."""
from __future__ import annotations

from pathlib import Path

from torchchat.export.files import written_in_place


def runner_tokenizer_path(artifact: Path) -> Path:
    """model.pte -> model.tokenizer.model (a .pt2 and a .pte of one export share it)."""
    return Path(artifact).with_suffix(".tokenizer.model")


def write_runner_tokenizer(tokenizer, artifacts: list[Path]) -> list[Path]:
    """Write the runner's tokenizer file beside each artifact when `tokenizer` came from a GGUF file and
    is a SentencePiece vocabulary; returns the files written (none for any other tokenizer)."""
    proto = getattr(tokenizer, "serialized_model_proto", None)
    if tokenizer.kind != "gguf" or proto is None:
        return []
    data = proto()
    written = []
    for path in dict.fromkeys(runner_tokenizer_path(a) for a in artifacts):
        with written_in_place(path) as tmp:
            tmp.write_bytes(data)
        written.append(path)
    return written
