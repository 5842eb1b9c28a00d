"""params JSON from outside: wrong types and out-of-range values are one ConfigError naming the key,
and a model that can never fit is refused before anything is allocated."""
import json

import pytest

from torchchat.errors import ConfigError, UserInputError
from torchchat.model.config import ModelConfig
from torchchat.model.params_check import check_caches_fit, check_model_fits

BASE = {"dim": 288, "n_layers": 6, "n_heads": 6, "vocab_size": 32000, "multiple_of": 32}


@pytest.mark.parametrize("change, match", [
    ({"n_heads": 0}, "n_heads 0 is out of range"),
    ({"multiple_of": 0}, "multiple_of 0 is out of range"),
    ({"dim": "288"}, "dim must be an integer"),
    ({"n_layers": 2147483648}, "n_layers 2147483648 is out of range"),
    ({"n_layers": True}, "n_layers must be an integer"),
    ({"norm_eps": -1}, "norm_eps -1 is out of range"),
    ({"norm_eps": float("nan")}, "norm_eps nan is out of range"),
    ({"rope_base": "1e4"}, "rope_base must be a number"),
    ({"ffn_dim_multiplier": 0}, "ffn_dim_multiplier 0 is out of range"),
    ({"n_kv_heads": 4}, "not a multiple of n_kv_heads"),
    ({"dim": 290}, "must split into n_heads"),
    ({"tie_embeddings": "yes"}, "tie_embeddings must be true or false"),
    ({"rope_scaling": {"factor": -8}}, "rope_scaling.factor"),
    ({"rope_scaling": [1]}, "rope_scaling must be an object"),
])
def test_bad_values_are_one_line(tmp_path, change, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**BASE, **change}))
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.from_json_file(path)
    assert "\n" not in str(e.value)


def test_valid_params_still_load():
    assert ModelConfig.from_params(BASE).hidden_dim == 768


def test_a_model_that_cannot_fit_is_refused_before_building():
    config = ModelConfig.from_params({**BASE, "dim": 16384, "n_layers": 4000, "n_heads": 128})
    with pytest.raises(UserInputError, match="needs about .* GiB and this machine has"):
        check_model_fits(config, 2, "cpu", "p.json")
    check_model_fits(ModelConfig.from_params(BASE), 2, "cpu", "p.json")


def test_a_cache_that_cannot_fit_is_refused():
    config = ModelConfig.from_params({**BASE, "max_seq_len": 1 << 24})
    with pytest.raises(UserInputError, match="lower --max-seq-length"):
        check_caches_fit(config, 1, 1 << 24, 4, "cpu")


def test_generate_refuses_huge_params_in_one_line(tmp_path, capsys, stories260k_dir):
    from torchchat.cli import main

    path = tmp_path / "p.json"
    path.write_text(json.dumps({**BASE, "dim": 16384, "n_layers": 4000, "n_heads": 128}))
    code = main(["generate", "--params-path", str(path), "--dummy-weights", "--prompt", "hi",
                 "--tokenizer-path", str(stories260k_dir / "tok512.model")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs about" in err, err
