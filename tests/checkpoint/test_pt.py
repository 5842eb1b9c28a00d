"""PyTorch state-dict checkpoints in the layouts users have: plain Meta names, a `model` sub-dict with
llama2.c's `model_args`, torch.compile's `_orig_mod.` prefix, and gpt-fast's fused wqkv."""
import pytest
import torch

from torchchat.build import load_weights
from torchchat.checkpoint import load_checkpoint
from torchchat.checkpoint.state_dict import normalize
from torchchat.errors import CheckpointError
from torchchat.model.transformer import Transformer


def _load(path, config):
    loaded = load_checkpoint(path)
    cfg = loaded.config or config
    with torch.device("meta"):
        model = Transformer(cfg)
    load_weights(model, normalize(loaded.state_dict, cfg), str(path))
    return loaded, model


def test_layouts_load_to_the_same_model(tiny_model, tmp_path):
    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = tiny_model.config
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    wrapped = tmp_path / "wrapped.pt"
    args = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim, max_seq_len=cfg.max_seq_len, dropout=0.0)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "model_args": args, "iter_num": 3}, wrapped)
    fused = tmp_path / "fused.pth"
    fsd = {}
    for k, v in sd.items():
        if ".attention.wq." in k:
            base = k.replace("wq.weight", "")
            fsd[base + "wqkv.weight"] = torch.cat([sd[base + "wq.weight"], sd[base + "wk.weight"], sd[base + "wv.weight"]])
        elif ".attention.wk." not in k and ".attention.wv." not in k:
            fsd[k] = v
    torch.save(fsd, fused)

    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        tiny_model.setup_caches(1, 16)
        expected = tiny_model(tokens, torch.arange(12))
        for path in (plain, wrapped, fused):
            loaded, model = _load(path, cfg)
            model.setup_caches(1, 16)
            torch.testing.assert_close(model(tokens, torch.arange(12)), expected)
    assert load_checkpoint(wrapped).config == cfg  # model_args gives the architecture


def test_shape_mismatch_names_tensor_and_shapes(tiny_model, tmp_path):
    from dataclasses import replace

    path = tmp_path / "m.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight' has shape \(512, 64\).*expects \(512, 32\)"):
        _load(path, replace(tiny_model.config, dim=32, head_dim=None))


def test_corrupt_pt_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
