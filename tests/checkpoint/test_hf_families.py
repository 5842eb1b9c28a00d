"""Llama's relatives (Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3/Phi-4-mini, SmolLM2/3) loaded from
Hugging Face folders into the one Transformer, against transformers' own classes with the same random
weights: full forward and token-by-token decode through the KV cache (fp32, atol 1e-4)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torchchat.build import load_weights  # noqa: E402
from torchchat.checkpoint import load_checkpoint  # noqa: E402
from torchchat.model.transformer import Transformer  # noqa: E402
from tests.conftest import assert_prefill_and_steps_match  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=8, attn_implementation="eager")


def _factors(n: int, seed: int) -> list[float]:
    return [1.0 + x for x in torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()]


def _longrope(original: int, n_factors: int = 4) -> dict:
    """n_factors: one per rotated pair, rope_dim / 2 (head_dim 16 at partial_rotary_factor 0.5: 4)."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": _factors(n_factors, 1), "long_factor": _factors(n_factors, 2),
            "original_max_position_embeddings": original}


# name -> (transformers config class, model class, config kwargs)
CASES = {
    "qwen2.5-tied-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, tie_word_embeddings=True)),
    "qwen3-qk-norm-head-dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(BASE, head_dim=32, tie_word_embeddings=True)),
    "gemma2-softcaps-sliding": ("Gemma2Config", "Gemma2ForCausalLM",
                                dict(GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3-local-global-rope": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                                 dict(GEMMA, layer_types=["sliding_attention", "full_attention"],
                                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                          "rope_theta": 1000000.0}})),
    "phi3-fused-longrope-short": ("Phi3Config", "Phi3ForCausalLM",
                                  dict(BASE, max_position_embeddings=256, original_max_position_embeddings=128,
                                       rope_parameters=_longrope(128))),
    "phi4mini-longrope-long-tied": ("Phi3Config", "Phi3ForCausalLM",
                                    dict(BASE, original_max_position_embeddings=32, tie_word_embeddings=True,
                                         rope_parameters=_longrope(32))),
    "smollm2-llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, tie_word_embeddings=True)),
    "smollm3-nope-layers": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(BASE, no_rope_layers=[1, 0])),
}

# One case per llama.cpp architecture, for the tests that take each family through the other paths
# (compile, export, quantize, tensor parallelism): family -> (case, tokenizer family of hf_family_folders).
FAMILIES = {
    "qwen2": ("qwen2.5-tied-qkv-bias", "qwen"),
    "qwen3": ("qwen3-qk-norm-head-dim", "qwen"),
    "gemma2": ("gemma2-softcaps-sliding", "gemma"),
    "gemma3": ("gemma3-local-global-rope", "gemma"),
    "phi3": ("phi3-fused-longrope-short", "phi"),
    "smollm3": ("smollm3-nope-layers", "smollm"),
}


def hf_model(case: str):
    config_cls, model_cls, kwargs = CASES[case]
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # non-trivial norms and biases too
    return model.eval()


def ours_from(folder) -> tuple[Transformer, object]:
    loaded = load_checkpoint(folder)
    assert loaded.format == "hf"
    with torch.device("meta"):
        model = Transformer(loaded.config)
    load_weights(model, loaded.state_dict, str(folder))
    return model.eval(), loaded.config


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_cached_decode_match_transformers(case, tmp_path):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    ours, config = ours_from(tmp_path)
    tokens = torch.randint(0, BASE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert_prefill_and_steps_match(ours, tokens, expected)
