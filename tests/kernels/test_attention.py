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


@pytest.mark.parametrize("rows,row0,positions,s_max,min_chunk", [
    (3, 0, [0, 17, 39], 40, 256),         # one split; a row at its first position
    (4, 1, [290, 5, 130, 64], 300, 64),   # several splits; rows [1, 5) of a cache of 6
])
def test_batched_attention_decode_matches_module_math(device, rows, row0, positions, s_max, min_chunk):
    """Each row at its own position in its own cache row, as KVCache.update with (B, 1) positions and
    SDPA with a per-row mask (the plain Transformer's batched decode)."""
    gen = torch.Generator().manual_seed(rows)
    heads, kv_heads, hd = 4, 2, 16
    scale = hd ** -0.5
    table = rope_table(s_max, hd, 10000.0).to(device)
    b_max = row0 + rows + 1
    history_k = torch.randn(b_max, kv_heads, s_max, hd, generator=gen).to(device)
    history_v = torch.randn(b_max, kv_heads, s_max, hd, generator=gen).to(device)
    ref_cache = KVCache(b_max, s_max, kv_heads, hd, torch.float32).to(device)
    ref_cache.k_cache.copy_(history_k)
    ref_cache.v_cache.copy_(history_v)
    k_cache, v_cache = history_k.clone(), history_v.clone()

    qkv = torch.randn(rows, (heads + 2 * kv_heads) * hd, generator=gen).to(device)
    pos = torch.tensor(positions, device=device).view(rows, 1)
    rope = table[pos]  # (B, 1, D/2, 2), as Transformer.forward indexes it
    out = attention_decode(qkv, rope, pos, k_cache, v_cache, heads, kv_heads, scale, min_chunk=min_chunk, row=row0)

    q, k, v = qkv.view(rows, 1, -1).split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q = apply_rope(q.reshape(rows, 1, heads, hd), rope).transpose(1, 2)
    k = apply_rope(k.reshape(rows, 1, kv_heads, hd), rope).transpose(1, 2)
    kk, vv = ref_cache.update(pos, k, v.reshape(rows, 1, kv_heads, hd).transpose(1, 2), row0)
    mask = (torch.arange(s_max, device=device).view(1, s_max) <= pos).view(rows, 1, 1, s_max)
    expect = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)

    assert out.shape == (rows, heads * hd)
    assert rel_err(out, expect.transpose(1, 2).reshape(rows, -1)) < 1e-5
    assert torch.allclose(k_cache, ref_cache.k_cache, atol=1e-6) and torch.equal(v_cache, ref_cache.v_cache)
    # Rows outside [row0, row0 + B) are untouched.
    assert torch.equal(k_cache[:row0], history_k[:row0]) and torch.equal(k_cache[row0 + rows:], history_k[row0 + rows:])


@pytest.mark.parametrize("s_max,min_chunk", [(40, 256), (300, 64)])  # one split, several
def test_idle_rows_write_and_read_nothing(device, s_max, min_chunk):
    """A negative position (an idle row of the engine's decode bucket): its cache row is untouched and
    its output is zeros, while the live row beside it decodes as alone."""
    gen = torch.Generator().manual_seed(s_max)
    heads, kv_heads, hd = 4, 2, 16
    table = rope_table(s_max, hd, 10000.0).to(device)
    k_cache = torch.randn(2, kv_heads, s_max, hd, generator=gen).to(device)
    v_cache = torch.randn(2, kv_heads, s_max, hd, generator=gen).to(device)
    k0, v0 = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(2, (heads + 2 * kv_heads) * hd, generator=gen).to(device)
    pos = torch.tensor([[s_max - 3], [-1]], device=device)
    out = attention_decode(qkv, table[pos], pos, k_cache, v_cache, heads, kv_heads, hd ** -0.5, min_chunk=min_chunk)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(k_cache[1], k0[1]) and torch.equal(v_cache[1], v0[1])
    alone_k, alone_v = k0[:1].clone(), v0[:1].clone()
    alone = attention_decode(qkv[0], table[pos[0]], pos[0], alone_k, alone_v, heads, kv_heads, hd ** -0.5,
                             min_chunk=min_chunk)
    assert torch.equal(out[0], alone) and torch.equal(k_cache[:1], alone_k)
