"""Registry entries of Llama's relatives: each shipped params table equals what the model's own
config.json (as published on the Hugging Face hub, hub dialect: rope_theta, rope_scaling,
rope_local_base_freq) gives through the HF loader's config translation."""
from __future__ import annotations

import math

import pytest

from torchchat.checkpoint.hf import config_from_hf
from torchchat.model.registry import params_table, resolve_model

PHI4_LONG = [1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
             2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
             6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
             16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
             32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]

# The architecture keys of each model's config.json on the hub.
HUB_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
        "max_window_layers": 21, "tie_word_embeddings": True, "hidden_act": "silu"},
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None,
        "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": True,
        "attention_bias": False, "hidden_act": "silu"},
    "google/gemma-3-1b-it": {
        "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_local_base_freq": 10000,
        "rope_scaling": None, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
        "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None, "final_logit_softcapping": None},
    "microsoft/Phi-4-mini-instruct": {
        "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "hidden_act": "silu",
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": PHI4_LONG}},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "tie_word_embeddings": True, "hidden_act": "silu"},
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_params_table_matches_the_hub_config(name):
    entry = resolve_model(name)
    assert entry.chat_template == "hf" and entry.is_chat
    table = params_table(entry.params)
    from_hub = config_from_hf(HUB_CONFIGS[name], source=name)
    mine, theirs = table.to_dict(), from_hub.to_dict()
    for key in theirs:
        if isinstance(theirs[key], float):
            assert math.isclose(mine[key], theirs[key], rel_tol=1e-12), key
        else:
            assert mine[key] == theirs[key], key


@pytest.mark.parametrize("alias,name", [("qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct"), ("qwen3", "Qwen/Qwen3-0.6B"),
                                        ("gemma3", "google/gemma-3-1b-it"), ("phi4-mini", "microsoft/Phi-4-mini-instruct"),
                                        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")])
def test_aliases(alias, name):
    assert resolve_model(alias).name == name


def test_gemma3_pattern_and_phi4_longrope():
    gemma = params_table("gemma-3-1b")
    assert gemma.sliding_layers == tuple(i for i in range(26) if i % 6 != 5) and gemma.sliding_window == 512
    phi = params_table("Phi-4-mini")
    assert phi.rotary_dim == 96 and phi.rope_scaling.rope_type == "longrope"
    assert math.isclose(phi.rope_scaling.attention_factor, 1.1902380714238083)
    assert not phi.sliding_layers  # its 262144 window is wider than the 131072 context
