"""llama2.c .bin exports: the real stories260K file (legacy format), a version-1 file written from its
weights per the format's definition, and truncated files."""
import struct

import numpy as np
import pytest
import torch

from torchchat.checkpoint import load_checkpoint
from torchchat.errors import CheckpointError


@pytest.fixture(scope="module")
def stories(stories260k_dir):
    return load_checkpoint(stories260k_dir / "stories260K.bin")


def test_header_facts(stories):
    c = stories.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_embeddings  # positive vocab_size in the legacy header: shared classifier
    assert stories.format == "llama2c"
    assert len(stories.state_dict) == 1 + 9 * 5 + 1  # embeddings, 9 tensors per layer, final norm


def _write_v1(path, cfg, sd, shared=True):
    with open(path, "wb") as f:
        f.write(struct.pack("<I", 0x616B3432))
        f.write(struct.pack("<i", 1))
        f.write(struct.pack("<7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                            cfg.vocab_size, cfg.max_seq_len))
        f.write(struct.pack("B", int(shared)))
        f.write(b"\0" * (256 - f.tell()))
        L = range(cfg.n_layers)
        order = [*(f"layers.{i}.attention_norm.weight" for i in L), *(f"layers.{i}.ffn_norm.weight" for i in L),
                 "norm.weight", "tok_embeddings.weight"]
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            order += [f"layers.{i}.{name}.weight" for i in L]
        for key in order:
            f.write(sd[key].numpy().astype(np.float32).tobytes())


def test_version1_export_loads_the_same_weights(stories, tmp_path):
    path = tmp_path / "v1.bin"
    _write_v1(path, stories.config, stories.state_dict)
    v1 = load_checkpoint(path)
    assert v1.config == stories.config
    assert v1.state_dict.keys() == stories.state_dict.keys()
    for key, value in stories.state_dict.items():
        assert torch.equal(v1.state_dict[key], value), key


def test_legacy_unshared_classifier(stories, tmp_path, stories260k_dir):
    raw = (stories260k_dir / "stories260K.bin").read_bytes()
    header = list(struct.unpack("<7i", raw[:28]))
    header[5] = -header[5]  # negative vocab: a separate classifier follows
    wcls = torch.randn(512, 64)
    path = tmp_path / "unshared.bin"
    path.write_bytes(struct.pack("<7i", *header) + raw[28:] + wcls.numpy().tobytes())
    loaded = load_checkpoint(path)
    assert not loaded.config.tie_embeddings
    assert torch.equal(loaded.state_dict["output.weight"], wcls)


def test_truncated_file_is_a_clear_error(tmp_path, stories260k_dir):
    raw = (stories260k_dir / "stories260K.bin").read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated llama2.c checkpoint"):
        load_checkpoint(path)


def test_garbage_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\xff" * 1000)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format"):
        load_checkpoint(path)
