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
_EXTENDED_HEADER = b"eh00"  # at byte 8: length u32, program_size u64, segment_base_offset u64, segment_data_size u64


def check_pte(path: Path, flag: str) -> None:
    """The sizes in a .pte's header must describe this file, before the native runtime trusts them:
    ExecuTorch verifies the flatbuffer itself, but not the segments (delegate blobs, weights) that it
    reaches through these offsets, and a damaged one can crash the process instead of raising."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(40)
    hint = "export it again"
    if len(head) < 40 or head[8:12] != _EXTENDED_HEADER:
        raise ExportError(f"{flag}: {path} is damaged or truncated (no ExecuTorch extended header); {hint}")
    root = int.from_bytes(head[0:4], "little")
    length = int.from_bytes(head[12:16], "little")
    program_size = int.from_bytes(head[16:24], "little")
    base = int.from_bytes(head[24:32], "little")
    segments = int.from_bytes(head[32:40], "little") if length >= 32 else 0
    problems = []
    if not 24 <= length <= 64:
        problems.append(f"header length {length}")
    if not 40 <= program_size <= size:
        problems.append(f"program size {program_size} for a file of {size} bytes")
    elif not 8 <= root < program_size:
        problems.append(f"root offset {root}")
    if base and (base < program_size or base + segments != size):
        problems.append(f"segments at {base}+{segments} in a file of {size} bytes")
    if problems:
        raise ExportError(f"{flag}: {path} is damaged or truncated ({', '.join(problems)}); {hint}")

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

    def __init__(self, path: Path, metadata: ArtifactMetadata, module):
        super().__init__(path, metadata)
        self._module = module

    @classmethod
    def load(cls, path: Path) -> "ExecuTorchRuntime":
        path = Path(path)
        flag = "--pte-path"
        head = read_head(path, 8, flag)
        if len(head) < 8 or head[4:6] != _PTE_IDENTIFIER:
            raise ExportError(f"{flag}: {path} is not an ExecuTorch program; export one with "
                              "`torchchat.py export MODEL --output-pte-path X.pte`")
        check_pte(path, flag)
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
        metadata = ArtifactMetadata.from_json(bytes(raw.numpy().tobytes()), str(path))
        return cls(path, metadata, module)

    def forward(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        """tokens (1, S) int64, input_pos (S,) int64 -> logits (1, S, V) float32."""
        self._check_inputs(tokens, input_pos)
        try:
            out = self._module.forward((tokens, input_pos))
        except RuntimeError as e:
            raise ExportError(f"{self.path}: ExecuTorch could not run forward ({e})") from e
        # The output lives in the program's planned memory, which the next call overwrites.
        return out[0].clone()
