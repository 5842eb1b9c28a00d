"""A bounded walk over a GGUF file's header, run before `gguf.GGUFReader` touches it.

GGUFReader trusts every count and length it reads: a corrupted array length makes it loop for hours
over zero-byte reads, and a truncated file fails deep inside numpy. This walk checks each length
against the bytes that are left, each tensor's type and extent against the file size, and raises one
CheckpointError naming what is wrong. Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version,
u64 tensor count, u64 metadata count, the metadata (key string, u32 type, value), the tensor infos
(name string, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset), padding to the alignment, data.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from torchchat.errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 1024  # bytes; llama.cpp's own limit for tensor names is 64

# GGUF metadata value types -> size in bytes of a scalar; STRING (8) and ARRAY (9) are variable.
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Cursor:
    def __init__(self, buf, size: int, source: str):
        self.buf, self.size, self.pos, self.source = buf, size, 0, source

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.source}: truncated or corrupted GGUF file: {what} at byte {self.pos} needs {n} bytes, "
                f"the file has {self.size - self.pos} left; download it again"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(what + " length")
        start = self.take(n, what)
        return bytes(self.buf[start : start + n])

    def name(self, what: str) -> str:
        """A key or tensor name: short, UTF-8 and printable, or the file is corrupted."""
        raw = self.string(what)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if not text or len(raw) > MAX_NAME or not text.isprintable():
            raise CheckpointError(f"{self.source}: corrupted GGUF file: {what} at byte {self.pos - len(raw)} is not a valid name")
        return text


def _skip_value(cur: _Cursor, type_id: int, key: str, depth: int = 0) -> None:
    if type_id in _SCALAR_SIZE:
        cur.take(_SCALAR_SIZE[type_id], f"value of '{key}'")
    elif type_id == _STRING:
        cur.take(cur.u64(f"string length of '{key}'"), f"string value of '{key}'")
    elif type_id == _ARRAY:
        if depth > 2:
            raise CheckpointError(f"{cur.source}: corrupted GGUF file: arrays nested too deeply in '{key}'")
        item_type = cur.u32(f"array type of '{key}'")
        count = cur.u64(f"array length of '{key}'")
        if item_type in _SCALAR_SIZE:
            cur.take(count * _SCALAR_SIZE[item_type], f"array '{key}' of {count} items")
            return
        if item_type not in (_STRING, _ARRAY):
            raise CheckpointError(f"{cur.source}: corrupted GGUF file: unknown array item type {item_type} in '{key}'")
        if count * 8 > cur.size - cur.pos:  # every string or array item takes at least 8 bytes
            raise CheckpointError(
                f"{cur.source}: truncated or corrupted GGUF file: array '{key}' claims {count} items, more than "
                "the file can hold; download it again"
            )
        for _ in range(count):
            _skip_value(cur, item_type, key, depth + 1)
    else:
        raise CheckpointError(f"{cur.source}: corrupted GGUF file: unknown metadata type {type_id} for '{key}'")


def check_gguf(path: Path) -> int:
    """Walk the header of `path`; raise CheckpointError if it is not a well-formed GGUF v2/v3 file whose
    tensors all lie inside it. Returns the number of tensors."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    source = str(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from e
    with f:
        size = path.stat().st_size
        if size < 24:
            raise CheckpointError(f"{source}: truncated GGUF file ({size} bytes); download it again")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, size, source)
            if bytes(buf[:4]) != MAGIC:
                raise CheckpointError(f"{source}: not a GGUF file (no 'GGUF' magic)")
            cur.take(4, "magic")
            version = cur.u32("version")
            if version not in (2, 3):
                hint = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
                raise CheckpointError(f"{source}: GGUF version {version} is not supported (2 and 3 are){hint}")
            n_tensors = cur.u64("tensor count")
            n_kv = cur.u64("metadata count")
            # Smallest metadata entry: 8-byte key length + 4-byte type + 1-byte value; smallest tensor info:
            # 8 + 4 + 8 + 4 + 8 bytes. Counts beyond that are corruption, refused before any loop.
            if n_kv * 13 + n_tensors * 32 > size - cur.pos:
                raise CheckpointError(
                    f"{source}: truncated or corrupted GGUF file: {n_kv} metadata entries and {n_tensors} tensors "
                    f"cannot fit in {size} bytes; download it again"
                )
            alignment = DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = cur.name("metadata key")
                type_id = cur.u32(f"type of '{key}'")
                if key == "general.alignment" and type_id == _UINT32:
                    alignment = cur.u32("general.alignment")
                    if alignment == 0 or alignment & (alignment - 1):
                        raise CheckpointError(f"{source}: corrupted GGUF file: alignment {alignment} is not a power of two")
                else:
                    _skip_value(cur, type_id, key)
            infos = []
            for i in range(n_tensors):
                name = cur.name(f"name of tensor {i}")
                n_dims = cur.u32(f"dimension count of '{name}'")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise CheckpointError(f"{source}: corrupted GGUF file: tensor '{name}' has {n_dims} dimensions")
                dims = tuple(cur.u64(f"dimensions of '{name}'") for _ in range(n_dims))
                type_id = cur.u32(f"type of '{name}'")
                offset = cur.u64(f"data offset of '{name}'")
                infos.append((name, dims, type_id, offset))
            data_start = -(-cur.pos // alignment) * alignment
            for name, dims, type_id, offset in infos:
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
                except (ValueError, KeyError):
                    raise CheckpointError(
                        f"{source}: tensor '{name}' has unknown GGML type {type_id}; the file is corrupted or newer "
                        "than the gguf package"
                    ) from None
                n = 1
                for d in dims:
                    n *= d
                if dims[0] % block:
                    raise CheckpointError(
                        f"{source}: corrupted GGUF file: tensor '{name}' row of {dims[0]} is not a multiple of its "
                        f"block size {block}"
                    )
                nbytes = n // block * type_size
                start = data_start + offset
                if start + nbytes > size:
                    raise CheckpointError(
                        f"{source}: truncated GGUF file: tensor '{name}' needs bytes {start}..{start + nbytes}, the "
                        f"file has {size}; download it again"
                    )
            return len(infos)
