import json

import pytest

from torchchat.errors import ConfigError, UnknownModelError
from torchchat.model.config import ModelConfig
from torchchat.model.registry import known_models, params_table, params_table_names, resolve_model

# Published architectures: (hidden_dim, n_kv_heads, head_dim) that Meta's width rule must reproduce.
KNOWN = {
    "stories15M": (768, 6, 48), "stories42M": (1376, 8, 64), "stories110M": (2048, 12, 64),
    "stories260K": (172, 4, 8), "7B": (11008, 32, 128), "13B": (13824, 40, 128), "70B": (28672, 8, 128),
    "CodeLlama-7b-Python": (11008, 32, 128), "Mistral-7B": (14336, 8, 128),
    "Meta-Llama-3-8B": (14336, 8, 128), "Meta-Llama-3-70B": (28672, 8, 128),
    "Meta-Llama-3.1-8B": (14336, 8, 128), "Meta-Llama-3.1-70B": (28672, 8, 128),
    "Meta-Llama-3.2-1B": (8192, 8, 64), "Meta-Llama-3.2-3B": (8192, 8, 128),
}


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_params_tables_have_published_shapes(key):
    cfg = params_table(key)
    assert (cfg.hidden_dim, cfg.n_kv_heads, cfg.head_dim) == KNOWN[key]


def test_all_required_tables_ship():
    assert set(KNOWN) <= set(params_table_names())


def test_llama31_has_rope_scaling_and_32_ties_embeddings():
    assert params_table("Meta-Llama-3.1-8B").rope_scaling.factor == 8.0
    assert params_table("Meta-Llama-3.2-1B").tie_embeddings


def test_every_registry_entry_points_at_a_table():
    names = set(params_table_names())
    for entry in known_models():
        assert entry.params in names, entry.name
        assert entry.hf_repo or entry.urls, entry.name


@pytest.mark.parametrize("alias,name", [("llama3.1", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
                                        ("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct"),
                                        ("mistral", "mistralai/Mistral-7B-Instruct-v0.2"),
                                        ("stories15M", "stories15M")])
def test_aliases_resolve_exactly(alias, name):
    assert resolve_model(alias).name == name


def test_unknown_name_suggests_close_ones():
    with pytest.raises(UnknownModelError, match="Did you mean: .*llama3.1"):
        resolve_model("llama3.11")
    with pytest.raises(UnknownModelError):
        resolve_model("llama")  # no substring matching


def test_params_dialects_agree():
    meta = ModelConfig.from_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                                    "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "rope_theta": 500000.0,
                                    "use_scaled_rope": True})
    gptfast = ModelConfig.from_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_local_heads": 8,
                                       "vocab_size": 128256, "intermediate_size": 14336, "rope_base": 500000.0,
                                       "rope_scaling": {"factor": 8.0}})
    assert meta == gptfast


def test_unknown_and_missing_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*dimm"):
        ModelConfig.from_params({"dimm": 4, "n_layers": 1, "n_heads": 1, "vocab_size": 8})
    with pytest.raises(ConfigError, match="missing required key 'vocab_size'"):
        ModelConfig.from_params({"dim": 4, "n_layers": 1, "n_heads": 1})
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(bad)


def test_config_round_trips_through_dict():
    cfg = params_table("Meta-Llama-3.1-8B")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
