"""The one seam between a model and the engine: eager, AOT Inductor and ExecuTorch all look alike."""
from torchchat.runtime.base import EagerRuntime, Runtime

__all__ = ["EagerRuntime", "Runtime"]
