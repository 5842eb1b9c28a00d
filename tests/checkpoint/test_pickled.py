"""Pickled checkpoints that are not weights (a list, a dict of strings, a pickle naming a global that
weights_only refuses) are one CheckpointError from every loader that reads pickles: .pt, Meta's
consolidated shards and Hugging Face pytorch_model.bin."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from torchchat.checkpoint.detect import load_checkpoint
from torchchat.errors import CheckpointError


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def _contents():
    return {
        "list": lambda p: torch.save([1, 2, 3], p),
        "dict of strings": lambda p: torch.save({"a": "b"}, p),
        "empty dict": lambda p: torch.save({}, p),
        "refused global": lambda p: torch.save({"x": _RunsCode()}, p),
        "raw pickle of a global": lambda p: p.write_bytes(pickle.dumps(_RunsCode(), protocol=2)),
        "truncated": lambda p: (torch.save({"w": torch.ones(4)}, p), p.write_bytes(p.read_bytes()[:100])),
    }


@pytest.mark.parametrize("what", list(_contents()))
@pytest.mark.parametrize("layout", ["pt", "meta", "hf"])
def test_non_weights_pickle_is_one_line(tmp_path, what, layout):
    if layout == "pt":
        path = tmp_path / "model.pth"
        _contents()[what](path)
        target = path
    elif layout == "meta":
        (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 8, "vocab_size": 32}))
        _contents()[what](tmp_path / "consolidated.00.pth")
        target = tmp_path
    else:
        (tmp_path / "config.json").write_text(json.dumps({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 8, "vocab_size": 32, "max_position_embeddings": 64}))
        _contents()[what](tmp_path / "pytorch_model.bin")
        target = tmp_path
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(target)
    assert "\n" not in str(e.value)
