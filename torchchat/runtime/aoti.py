"""Running AOT Inductor artifacts: a .pt2 package (metadata inside) or a bare .so (metadata in the
sidecar `X.so.json`, see torchchat/export/aoti.py)."""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import torch
from torch import Tensor

from torchchat.errors import DeviceError, ExportError
from torchchat.export.aoti import METADATA_KEY, sidecar_path
from torchchat.export.metadata import ArtifactMetadata
from torchchat.runtime.exported import ExportedRuntime, read_head

_ZIP_MAGIC = b"PK\x03\x04"
_ELF_MAGIC = b"\x7fELF"


def _check_device(metadata: ArtifactMetadata, path: Path) -> None:
    if metadata.device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{path} was compiled for CUDA and this machine has none; re-export with --device cpu")


def _calls_cpu_ops(path: Path) -> bool:
    """Whether a .pt2 package calls torchchat's CPU operators: its metadata is readable only once the
    package is loaded, and loading looks the operators up, so the compiled program's list of calls
    outside torch (`*.wrapper.json`) is read instead. A damaged archive answers False here and is
    reported by the archive check (runtime/aoti_archive.py)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".json") and "/aotinductor/" in info.filename:
                    if b"torchchat_cpu::" in zf.read(info):
                        return True
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError, zlib.error):
        return False
    return False


def _load_cpu_ops() -> None:
    """Load torchchat's CPU kernel library (building it on first use); MissingDependencyError if it cannot."""
    from torchchat.kernels.cpu import ensure_loaded

    ensure_loaded()


class AOTIRuntime(ExportedRuntime):
    """Loads and runs an AOT Inductor .pt2 package or .so library. The KV cache lives in the
    compiled model's constant buffers and is updated in place by each call."""

    backend = "aoti"
    precompiled = True  # see torchchat.generation.steps.Steps

    def __init__(self, path: Path, metadata: ArtifactMetadata, run, graphable: bool = False):
        super().__init__(path, metadata)
        self._run = run  # (tokens, input_pos) -> logits
        # graphable: loaded single-threaded (aoti_archive.load_package), the form a capture leaves working.
        if graphable and self.device.type == "cuda" and os.environ.get("TORCHCHAT_AOTI_GRAPH", "1") != "0":
            # The compiled model launches its kernels on the current stream, allocates through the
            # caching allocator and keeps the KV cache in buffers of fixed address, so a decode step
            # can be captured into a CUDA graph and replayed (one graph: one input shape, one cache).
            # TORCHCHAT_AOTI_GRAPH=0 launches the kernels one by one instead.
            self.graph_key = lambda: ("aoti", str(self.path))

    @classmethod
    def load_package(cls, path: Path) -> "AOTIRuntime":
        path = Path(path)
        flag = "--aoti-package-path"
        if read_head(path, 4, flag) != _ZIP_MAGIC:
            raise ExportError(f"{flag}: {path} is not an AOT Inductor package (.pt2 is a zip archive); export one with "
                              "`torchchat.py export MODEL --output-aoti-package-path X.pt2`")
        from torchchat.runtime.aoti_archive import load_package

        if _calls_cpu_ops(path):
            _load_cpu_ops()

        compiled = load_package(path, flag)
        text = compiled.get_metadata().get(METADATA_KEY)
        if text is None:
            raise ExportError(f"{flag}: {path} carries no torchchat metadata; export it with `torchchat.py export`")
        metadata = ArtifactMetadata.from_json(text, str(path))
        _check_device(metadata, path)
        return cls(path, metadata, compiled, graphable=True)

    @classmethod
    def load_shared_library(cls, path: Path) -> "AOTIRuntime":
        path = Path(path)
        flag = "--dso-path"
        if read_head(path, 4, flag) != _ELF_MAGIC:
            raise ExportError(f"{flag}: {path} is not a shared library; export one with "
                              "`torchchat.py export MODEL --output-dso-path X.so`")
        side = sidecar_path(path)
        if not side.is_file():
            raise ExportError(f"{flag}: {side} (the metadata written beside {path.name} at export) is missing; "
                              "keep the two files together or export again")
        try:
            text = side.read_bytes()
        except OSError as e:
            raise ExportError(f"{flag}: cannot read {side} ({e})") from e
        metadata = ArtifactMetadata.from_json(text, str(side))
        size = metadata.extra.get("artifact_bytes")
        if size is not None and size != path.stat().st_size:
            raise ExportError(f"{flag}: {side} describes a different library than {path} (sizes differ); "
                              "keep each .so with its own .so.json or export again")
        _check_device(metadata, path)
        if "torchchat_cpu" in metadata.native_ops:
            _load_cpu_ops()
        try:
            if metadata.device.startswith("cuda"):
                runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(path), 1, metadata.device)
            else:
                runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        except Exception as e:  # RuntimeError from dlopen or the model container
            raise ExportError(f"{flag}: {path} could not be loaded ({str(e).splitlines()[0]}); export it again") from e

        def run(tokens: Tensor, input_pos: Tensor) -> Tensor:
            return runner.run([tokens, input_pos])[0]

        return cls(path, metadata, run)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens (1, S) int64, input_pos (S,) int64 -> logits (1, S, V) float32."""
        self._check_inputs(tokens, input_pos)
        return self._run(tokens, input_pos)
