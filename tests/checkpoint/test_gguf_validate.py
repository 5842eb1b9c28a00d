"""GGUF damage that parses and loads, and used to print garbage with exit 0: a tensor offset moved
into another tensor, a tensor type changed, eps -1. Each is now one CheckpointError."""
from __future__ import annotations

import struct

import pytest

from torchchat.checkpoint.detect import load_checkpoint
from torchchat.errors import CheckpointError


def _field_byte(reader, field, part: int) -> int:
    """File offset of part `part` of a reader field (tensor info or metadata entry)."""
    pos = field.offset
    for p in field.parts[:part]:
        pos += p.nbytes
    return pos


@pytest.fixture(scope="module")
def gguf_bytes(stories260k_dir):
    return (stories260k_dir / "stories260K.gguf").read_bytes()


@pytest.fixture(scope="module")
def layout(stories260k_dir):
    from gguf import GGUFReader

    reader = GGUFReader(stories260k_dir / "stories260K.gguf")
    t1, t2 = reader.tensors[1], reader.tensors[2]
    eps = reader.fields["llama.attention.layer_norm_rms_epsilon"]
    return {
        "offset_1": _field_byte(reader, t1.field, len(t1.field.parts) - 1),
        "type_1": _field_byte(reader, t1.field, len(t1.field.parts) - 2),
        "offset_2_value": struct.unpack_from("<Q", reader.data, _field_byte(reader, t2.field, len(t2.field.parts) - 1))[0],
        "eps": _field_byte(reader, eps, len(eps.parts) - 1),
    }


def _load(tmp_path, data: bytes):
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    return load_checkpoint(path)


def test_intact_file_loads(tmp_path, gguf_bytes):
    assert _load(tmp_path, gguf_bytes).config.n_layers == 5


@pytest.mark.parametrize("damage, match", [
    ("offset_into_next", "overlaps|unused bytes"),
    ("misaligned_offset", "not a multiple of the alignment"),
    ("type_f16", "unused bytes|overlaps|bytes after the last tensor"),
    ("eps_negative", "layer_norm_rms_epsilon"),
    ("eps_nan", "layer_norm_rms_epsilon"),
])
def test_damage_is_refused(tmp_path, gguf_bytes, layout, damage, match):
    data = bytearray(gguf_bytes)
    if damage == "offset_into_next":
        struct.pack_into("<Q", data, layout["offset_1"], layout["offset_2_value"])
    elif damage == "misaligned_offset":
        old = struct.unpack_from("<Q", data, layout["offset_1"])[0]
        struct.pack_into("<Q", data, layout["offset_1"], old + 4)
    elif damage == "type_f16":
        struct.pack_into("<I", data, layout["type_1"], 1)  # F32 -> F16: half the bytes
    elif damage == "eps_negative":
        struct.pack_into("<f", data, layout["eps"], -1.0)
    elif damage == "eps_nan":
        struct.pack_into("<f", data, layout["eps"], float("nan"))
    with pytest.raises(CheckpointError, match=match) as e:
        _load(tmp_path, bytes(data))
    assert "\n" not in str(e.value)
