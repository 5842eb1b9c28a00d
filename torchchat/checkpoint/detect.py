"""Pick the loader from what a checkpoint path holds."""
from __future__ import annotations

import zipfile
from pathlib import Path

from torchchat.checkpoint.loaded import LoadedCheckpoint, LoadOptions
from torchchat.errors import CheckpointError


def load_checkpoint(path: Path, options: LoadOptions | None = None) -> LoadedCheckpoint:
    from torchchat.checkpoint import consolidated, hf, llama2c, pt

    path = Path(path)
    options = options or LoadOptions()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        if hf.is_hf_dir(path):
            config, sd = hf.load_hf_dir(path)
            return LoadedCheckpoint(sd, config, "hf")
        consolidated_dir = consolidated.find_consolidated_dir(path)
        if consolidated_dir is not None:
            config, sd = consolidated.load_consolidated_dir(consolidated_dir)
            return LoadedCheckpoint(sd, config, "meta")
        raise CheckpointError(
            f"{path}: a directory checkpoint needs a Hugging Face config.json, or Meta params.json + consolidated.*.pth"
        )
    try:
        with path.open("rb") as f:
            head = f.read(256)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from e
    size = path.stat().st_size
    if head[:4] == b"GGUF":
        from torchchat.checkpoint.gguf import load_gguf

        return load_gguf(path, options)
    if consolidated.is_consolidated_shard(path):
        config, sd = consolidated.load_consolidated_dir(path.parent)
        return LoadedCheckpoint(sd, config, "meta")
    if zipfile.is_zipfile(path) or head[:2] == b"\x80\x02":
        config, sd = pt.load_pt(path)
        return LoadedCheckpoint(sd, config, "pt")
    if llama2c.is_llama2c(head, size):
        config, sd = llama2c.load_llama2c(path)
        return LoadedCheckpoint(sd, config, "llama2c")
    if path.suffix == ".safetensors":
        sd = hf._read(path)
        return LoadedCheckpoint(dict(sd), None, "safetensors")
    raise CheckpointError(
        f"{path}: unrecognised checkpoint format (expected a PyTorch .pt/.pth, a llama2.c .bin, a GGUF file "
        "or a Hugging Face directory)"
    )
