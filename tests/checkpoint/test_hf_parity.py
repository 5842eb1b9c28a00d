"""Our Transformer, loaded from a Hugging Face directory, against transformers' own implementation with
the same random weights: full forward and token-by-token decode through the KV cache."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchchat.build import load_weights  # noqa: E402
from torchchat.checkpoint import load_checkpoint  # noqa: E402
from torchchat.model.transformer import Transformer  # noqa: E402
from tests.conftest import assert_prefill_and_steps_match  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
            max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}

CASES = {
    "llama2-mha": ("llama", dict(BASE)),
    "llama3-gqa": ("llama", dict(BASE, num_key_value_heads=2, rope_theta=500000.0)),
    "llama3.1-rope-scaling": ("llama", dict(BASE, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)),
    "tied-embeddings": ("llama", dict(BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    "biases": ("llama", dict(BASE, attention_bias=True, mlp_bias=True)),
    "granite-multipliers": ("granite", dict(BASE, num_key_value_heads=2, embedding_multiplier=2.0,
                                            attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=4.0)),
}


def _hf_model(kind: str, kwargs: dict):
    if kind == "granite":
        config = transformers.GraniteConfig(**kwargs)
        model = transformers.GraniteForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # non-trivial norms and biases too
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, kwargs = CASES[case]
    hf = _hf_model(kind, kwargs)
    hf.save_pretrained(tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.format == "hf"
    with torch.device("meta"):
        ours = Transformer(loaded.config)
    load_weights(ours, loaded.state_dict, str(tmp_path))
    ours.eval()

    tokens = torch.randint(0, kwargs["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert loaded.config.tie_embeddings == bool(kwargs.get("tie_word_embeddings", False))
    assert_prefill_and_steps_match(ours, tokens, expected)


def test_unknown_weight_names_are_named(tmp_path):
    kind, kwargs = CASES["llama2-mha"]
    hf = _hf_model(kind, kwargs)
    state = hf.state_dict()
    state["model.layers.0.self_attn.rotary_scale.weight"] = torch.zeros(3)
    hf.save_pretrained(tmp_path, state_dict=state)
    from torchchat.errors import CheckpointError

    with pytest.raises(CheckpointError, match="rotary_scale"):
        load_checkpoint(tmp_path)
