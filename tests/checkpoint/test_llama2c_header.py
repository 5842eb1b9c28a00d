"""A llama2.c header edited to fewer layers or heads still "fits" the larger file and used to decode
into garbage: the file size must be exactly what the header describes."""
import struct

import pytest

from torchchat.checkpoint.detect import load_checkpoint
from torchchat.errors import CheckpointError

FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


@pytest.mark.parametrize("field, value, match", [
    ("n_layers", 4, "header describes"),
    ("n_layers", 0, "unrecognised checkpoint format"),  # implausible: not taken for llama2.c at all
    ("n_heads", 4, "truncated"),  # larger heads need larger RoPE tables
    ("n_kv_heads", 2, "header describes"),
    ("hidden_dim", 100, "header describes"),
    ("seq_len", 256, "header describes"),
    ("dim", 0x7FFFFFFF, "unrecognised checkpoint format"),
    ("n_layers", 6, "truncated"),
])
def test_header_must_describe_the_file(stories260k_dir, tmp_path, field, value, match):
    data = bytearray((stories260k_dir / "stories260K.bin").read_bytes())
    struct.pack_into("<i", data, 4 * FIELDS.index(field), value)
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_extra_bytes_are_refused(stories260k_dir, tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes((stories260k_dir / "stories260K.bin").read_bytes() + b"\0" * 4)
    with pytest.raises(CheckpointError, match="header describes"):
        load_checkpoint(path)
