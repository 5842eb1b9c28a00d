"""Meta's original/ folders: params.json + consolidated.NN.pth, one slice or model-parallel slices."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from torchchat.checkpoint import load_checkpoint
from torchchat.errors import CheckpointError

ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def _params(cfg, vocab_size):
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "multiple_of": 32, "norm_eps": cfg.norm_eps, "vocab_size": vocab_size}


def _slices(state, n, embedding_dim):
    """Cut a state dict the way Meta's model-parallel layers hold it: column-parallel weights by rows,
    row-parallel ones (wo, w2) by columns, the embedding along `embedding_dim`, norms whole."""
    shards = [{} for _ in range(n)]
    for key, value in state.items():
        if value.ndim == 1:
            parts = [value.clone()] * n
        elif key == "tok_embeddings.weight":
            parts = value.chunk(n, dim=embedding_dim)
        else:
            parts = value.chunk(n, dim=1 if key.endswith(ROW_PARALLEL) else 0)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def _write(folder, state, cfg, n, embedding_dim=0, vocab_size=None):
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(_params(cfg, vocab_size or cfg.vocab_size)))
    for i, shard in enumerate(_slices(state, n, embedding_dim)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("n, embedding_dim", [(1, 0), (2, 0), (2, 1), (4, 1)],
                         ids=["one-slice", "llama3-vocab-parallel", "llama2-dim-parallel", "four-slices"])
def test_slices_join_into_the_model(tmp_path, tiny_model, tiny_config, n, embedding_dim):
    state = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    _write(tmp_path / "original", state, tiny_config, n, embedding_dim)
    for path in (tmp_path, tmp_path / "original", tmp_path / "original" / "consolidated.00.pth"):
        loaded = load_checkpoint(path)
        assert loaded.format == "meta"
        assert loaded.config == replace(tiny_config, max_seq_len=2048)  # params.json does not say; the default
        assert set(loaded.state_dict) == set(state)
        for key, value in state.items():
            assert torch.equal(loaded.state_dict[key], value), key


def test_llama2_vocab_size_comes_from_the_embedding(tmp_path, tiny_model, tiny_config):
    state = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    _write(tmp_path / "original", state, tiny_config, 1, vocab_size=-1)  # Llama 2's params.json says -1
    assert load_checkpoint(tmp_path).config.vocab_size == tiny_config.vocab_size


def test_slices_of_different_models_are_refused(tmp_path, tiny_model, tiny_config):
    state = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    _write(tmp_path / "original", state, tiny_config, 2)
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4)}, tmp_path / "original" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth: its tensors differ"):
        load_checkpoint(tmp_path)
