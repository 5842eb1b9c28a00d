"""Checkpoint formats -> (state dict in our parameter names, config if the file says it).

The format is decided from the file's content (magic bytes, directory contents), not its name."""
from torchchat.checkpoint.detect import load_checkpoint
from torchchat.checkpoint.loaded import LoadedCheckpoint, LoadOptions

__all__ = ["LoadedCheckpoint", "LoadOptions", "load_checkpoint"]
