"""Decode attention kernel (RoPE + cache write + attention, split or not) against the Attention
module's math: apply_rope, KVCache.update and scaled_dot_product_attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tests.kernels.numerics import rel_err  # noqa: E402
from torchchat.kernels.attention import attention_decode, split_plan  # noqa: E402
from torchchat.model.kv_cache import KVCache  # noqa: E402
from torchchat.model.rope import apply_rope, rope_table  # noqa: E402


@pytest.mark.parametrize("heads,kv_heads,s_max,pos,min_chunk", [
    (4, 4, 40, 0, 256),     # first position: attends to itself only
    (4, 2, 40, 23, 256),    # GQA, one split
    (8, 2, 300, 290, 64),   # GQA, several splits, the new token in the last chunk
    (2, 1, 300, 70, 64),    # later splits empty
])
def test_attention_decode_matches_module_math(device, heads, kv_heads, s_max, pos, min_chunk):
    gen = torch.Generator().manual_seed(pos)
    hd = 16
    scale = hd ** -0.5
    table = rope_table(s_max, hd, 10000.0).to(device)
    ref_cache = KVCache(1, s_max, kv_heads, hd, torch.float32).to(device)
    history_k = torch.randn(1, kv_heads, s_max, hd, generator=gen).to(device)
    history_v = torch.randn(1, kv_heads, s_max, hd, generator=gen).to(device)
    ref_cache.k_cache.copy_(history_k)
    ref_cache.v_cache.copy_(history_v)
    # The kernel's cache holds the same history; positions after `pos` hold junk it must not read.
    k_cache, v_cache = history_k.clone(), history_v.clone()

    qkv = torch.randn((heads + 2 * kv_heads) * hd, generator=gen).to(device)
    input_pos = torch.tensor([pos], device=device)
    out = attention_decode(qkv, table[input_pos], input_pos, k_cache, v_cache, heads, kv_heads, scale,
                           min_chunk=min_chunk)

    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd])
    q = apply_rope(q.view(1, 1, heads, hd), table[input_pos]).transpose(1, 2)
    k = apply_rope(k.view(1, 1, kv_heads, hd), table[input_pos]).transpose(1, 2)
    kk, vv = ref_cache.update(input_pos, k, v.view(1, 1, kv_heads, hd).transpose(1, 2))
    mask = torch.arange(s_max, device=device).view(1, 1, 1, s_max) <= pos
    expect = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)

    assert rel_err(out, expect.reshape(-1)) < 1e-5
    assert rel_err(k_cache[0, :, pos], ref_cache.k_cache[0, :, pos]) < 1e-6
    assert torch.equal(v_cache[0, :, pos], ref_cache.v_cache[0, :, pos])
    untouched = torch.ones(s_max, dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(k_cache[0][:, untouched], history_k[0][:, untouched])


def test_split_plan_covers_the_cache():
    assert split_plan(206) == (1, 256)
    for s_max in (513, 1000, 4096, 8192, 131072):
        splits, chunk = split_plan(s_max)
        assert splits * chunk >= s_max and splits & (splits - 1) == 0 and splits <= 16 and chunk % 64 == 0
