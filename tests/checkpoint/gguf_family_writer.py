"""A GGUF file of a tiny HF folder written with the `gguf` package, laid out as llama.cpp's
convert_hf_to_gguf.py lays it out (tensor names, metadata keys, Gemma's norms stored as 1 + w, SmolLM3's
q/k permuted to llama.cpp's RoPE pairs, Phi-3's LongRoPE factors as tensors): the stand-in for the
converter where llama.cpp's source tree is absent. Only what the test families need."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate_up_proj": "ffn_up",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GEMMA_LAYER = dict(_LAYER, post_attention_layernorm="post_attention_norm", pre_feedforward_layernorm="ffn_norm",
                    post_feedforward_layernorm="post_ffw_norm")
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def _llama_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rows -> llama.cpp's (Meta's) adjacent pairs, as the converter's LlamaModel.permute."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_family_gguf(folder: Path, arch: str, pre: str, out: Path) -> None:
    import gguf
    from safetensors.torch import load_file

    hf = json.loads((folder / "config.json").read_text())
    gemma = arch in ("gemma2", "gemma3")
    rope = hf.get("rope_parameters") or {}
    full_rope = rope.get("full_attention", rope)
    n_heads, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(full_rope["rope_theta"])
    if hf.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if gemma:
        if hf.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(hf["attn_logit_softcapping"])
        if hf.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hf["final_logit_softcapping"])
        w.add_sliding_window(hf["sliding_window"])
        if "sliding_attention" in rope:
            w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        if full_rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full_rope["factor"])
    tensors = {}
    if arch == "phi3":
        rope_dim = int(full_rope.get("partial_rotary_factor", 1.0) * head_dim)
        original = full_rope["original_max_position_embeddings"]
        scale = hf["max_position_embeddings"] / original
        w.add_rope_dimension_count(rope_dim)
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_sliding_window(hf.get("sliding_window") or 0)
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        tensors["rope_factors_long.weight"] = torch.tensor(full_rope["long_factor"], dtype=torch.float32)
        tensors["rope_factors_short.weight"] = torch.tensor(full_rope["short_factor"], dtype=torch.float32)

    layer_map = _GEMMA_LAYER if gemma else _LAYER
    for key, value in load_file(folder / "model.safetensors").items():
        value = value.float()
        if key in _TOP:
            name = _TOP[key]
        else:
            _, _, n, *rest = key.split(".")
            part, kind = ".".join(rest[:-1]), rest[-1]
            name = f"blk.{n}.{layer_map[part]}.{kind}"
        if gemma and name.endswith("norm.weight"):
            value = value + 1
        if arch == "smollm3" and (".attn_q." in name or ".attn_k." in name):
            value = _llama_permute(value, n_heads if ".attn_q." in name else n_kv)
        tensors[name] = value
    for name, value in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(value.numpy()))

    tok = json.loads((folder / "tokenizer.json").read_text())
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab.update(specials)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab[tok_config["eos_token"]])
    if tok_config.get("bos_token"):
        w.add_bos_token_id(vocab[tok_config["bos_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_config["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
