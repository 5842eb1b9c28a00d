"""Running ExecuTorch .pte programs through ExecuTorch's Python bindings of its C++ runtime (the
bindings alone: `executorch.runtime` would also import the exir compiler, seconds of start-up)."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from torch import Tensor

from torchchat.errors import ExportError, MissingDependencyError
from torchchat.export.executorch import INSTALL_HINT, METADATA_METHOD
from torchchat.export.metadata import ArtifactMetadata
from torchchat.runtime.exported import ExportedRuntime, read_head

_PTE_IDENTIFIER = b"ET"  # bytes 4..6 of a .pte: the flatbuffer file identifier "ET12" and later

log = logging.getLogger(__name__)


def _start_threadpool(bindings) -> None:
    """Start ExecuTorch's threadpool now, passing what it prints to `log` (torchchat.cli hides it
    unless -v). On first use it probes the CPU and writes lines such as "[cpuinfo_utils.cpp:71] Reading
    file /sys/devices/soc0/image_version" from C++ straight to file descriptor 2, which no Python
    setting reaches; left to the first forward they would land in the middle of the generated text."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            bindings._threadpool_get_thread_count()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        for line in captured.read().decode(errors="replace").splitlines():
            log.warning("%s", line)


def import_bindings():
    try:
        import torch  # noqa: F401  the bindings resolve libtorch's symbols from the loaded torch

        from executorch.extension.pybindings import _C as bindings

        # Registers the quantized kernels (embedding_byte, embedding_4bit) with the runtime: a program
        # with quantized embeddings fails with "Missing operator" without it.
        import executorch.kernels.quantized  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"running a .pte needs executorch==1.5.1 ({e}); {INSTALL_HINT}") from e
    return bindings


class ExecuTorchRuntime(ExportedRuntime):
    """A .pte's `forward` method. The KV cache is a mutable buffer of the program, kept between calls."""

    backend = "executorch"

    def __init__(self, path: Path, meta: ArtifactMetadata, module):
        super().__init__(path, meta)
        self._module = module

    @classmethod
    def load(cls, path: Path) -> "ExecuTorchRuntime":
        path = Path(path)
        flag = "--pte-path"
        head = read_head(path, 8, flag)
        if len(head) < 8 or head[4:6] != _PTE_IDENTIFIER:
            raise ExportError(f"{flag}: {path} is not an ExecuTorch program; export one with "
                              "`torchchat.py export MODEL --output-pte-path X.pte`")
        bindings = import_bindings()
        _start_threadpool(bindings)
        # Loading is lazy: a damaged program shows when its methods are first read.
        try:
            module = bindings._load_for_executorch(str(path))
            names = set(module.method_names())
        except RuntimeError as e:
            raise ExportError(f"{flag}: {path} is damaged or truncated ({e}); export it again") from e
        if METADATA_METHOD not in names or "forward" not in names:
            raise ExportError(f"{flag}: {path} carries no torchchat metadata; export it with `torchchat.py export`")
        try:
            raw = module.run_method(METADATA_METHOD, ())[0]
        except RuntimeError as e:
            raise ExportError(f"{flag}: {path}: cannot read its metadata ({e}); export it again") from e
        meta = ArtifactMetadata.from_json(bytes(raw.numpy().tobytes()), str(path))
        return cls(path, meta, module)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens (1, S) int64, input_pos (S,) int64 -> logits (1, S, V) float32."""
        self._check_inputs(tokens, input_pos)
        try:
            out = self._module.forward((tokens, input_pos))
        except RuntimeError as e:
            raise ExportError(f"{self.path}: ExecuTorch could not run forward ({e})") from e
        # The output lives in the program's planned memory, which the next call overwrites.
        return out[0].clone()
