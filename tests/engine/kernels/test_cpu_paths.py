"""The CPU engine's attention pieces: decode plan, fresh-prompt prefill, float32 over bf16 K/V."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import attention, paged_attention_torch, store_kv_torch
from engine.kernels.attention import paged_decode_torch, plan_decode, prefill_attention
from engine.kernels.kv_write import key_rows, store_kv_rows
from engine.kv_cache import kv_layer
from tests.engine.kernels.test_paged_attention import assert_close, make_batch, naive_attention


@pytest.mark.parametrize("seq_lens", [[5, 17, 9], [16, 16], [1]])
def test_decode_plan_matches_reference(seq_lens: list[int]) -> None:
    batch = make_batch([1] * len(seq_lens), seq_lens, 8, 4, 16, 4, torch.float32)
    plan = plan_decode(batch.kv_layer, batch.block_tables, batch.seq_lens, max(seq_lens))
    assert (plan.mask is None) == (len(set(seq_lens)) == 1)
    assert_close(paged_decode_torch(batch.q, batch.kv_layer, plan, batch.scale), batch)


@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1, 1], [5, 17, 9]), ([20, 7], [20, 7]),
                                             ([6, 3], [21, 10]), ([1, 9, 1], [13, 9, 30])])
def test_float32_queries_over_a_bfloat16_cache(q_lens: list[int], seq_lens: list[int]) -> None:
    """The bf16-on-AVX2 mode: K/V stay bf16 in the cache and are upcast when read."""
    batch = make_batch(q_lens, seq_lens, 8, 4, 32, 4, torch.bfloat16)
    q32 = batch.q.float()  # [T, Hq, D]
    out = paged_attention_torch(q32, *batch.args("cpu")[1:])
    assert out.dtype == torch.float32
    ref = naive_attention(q32, batch.kv_layer, batch.block_tables, batch.query_start_loc,
                          batch.seq_lens, batch.scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tile", [128, 4])
@pytest.mark.parametrize("seq_lens", [[12, 12, 12], [20, 7, 1]])
def test_prefill_attention_is_causal_per_prompt(seq_lens: list[int], tile: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "CAUSAL_TILE", tile)  # 4: short prompts run in tiles too
    gen = torch.Generator().manual_seed(0)
    total, hq, hkv, d = sum(seq_lens), 8, 2, 16
    q = torch.randn(total, hq, d, generator=gen)  # [T, Hq, D]
    k, v = torch.randn(2, total, hkv, d, generator=gen)  # [T, Hkv, D] each
    out = prefill_attention(q, k, v, seq_lens, d**-0.5)  # [T, Hq, D]
    start = 0
    for n in seq_lens:
        for i in range(n):
            for h in range(hq):
                keys = k[start:start + i + 1, h // (hq // hkv)]  # [i+1, D]
                p = torch.softmax(keys @ q[start + i, h] * d**-0.5, 0)  # [i+1]
                expected = p @ v[start:start + i + 1, h // (hq // hkv)]  # [D]
                torch.testing.assert_close(out[start + i, h], expected, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("length", [256, 300, 512, 777])
def test_causal_attention_in_tiles_matches_one_call(length: int) -> None:
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(2, 8, length, 32, generator=gen)  # [B, Hq, L, D]
    k, v = torch.randn(2, 2, 4, length, 32, generator=gen)  # [B, Hkv, L, D] each
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True)  # [B, Hq, L, D]
    torch.testing.assert_close(attention.causal_attention(q, k, v, 32**-0.5), expected)


STORE_BS = 4  # block size of the store_kv cases


def _store_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """slots `[T]`, key and value `[T, Hkv, D]`, and a 6-block layer that store_kv filled."""
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([3, 22, 9, 0, 17])  # [T]
    key, value = torch.randn(2, 5, 2, 8, generator=gen)  # [T, Hkv, D] each
    expected = torch.zeros(6, 2, STORE_BS, 2, 8)  # [N, 2, bs, Hkv, D]
    store_kv_torch(key, value, expected, slots)
    return slots, key, value, expected


def test_store_kv_rows_matches_store_kv() -> None:
    slots, key, value, expected = _store_case()
    bs = STORE_BS
    got = torch.zeros_like(expected)
    store_kv_rows(key, value, got, key_rows(slots, bs, 2 * bs))
    assert torch.equal(got, expected)


def _in_layer_group(layer: torch.Tensor, group: int, index: int) -> torch.Tensor:
    """`layer` `[N, 2, bs, Hkv, D]` copied into layer `index` of a cache of layer groups."""
    num_blocks = layer.shape[0]
    cache = torch.full((1, num_blocks, group, *layer.shape[1:]), float("nan"),
                       dtype=layer.dtype)  # [G, N, g, 2, bs, Hkv, D]
    view = kv_layer(cache, index)  # [N, 2, bs, Hkv, D], blocks `group` layers apart
    view.copy_(layer)
    return view


@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1, 1], [5, 17, 9]), ([20, 7], [20, 7]),
                                             ([6, 3], [21, 10]), ([1, 9, 1], [13, 9, 30])])
def test_attention_over_a_layer_group_cache(q_lens: list[int], seq_lens: list[int]) -> None:
    """The fast paths read a layer whose blocks are strided (other layers in between, NaN)."""
    batch = make_batch(q_lens, seq_lens, 8, 4, 16, 4, torch.float32)
    expected = paged_attention_torch(*batch.args("cpu"))
    batch.kv_layer = _in_layer_group(batch.kv_layer, 3, 1)
    assert not batch.kv_layer.is_contiguous()
    assert_close(paged_attention_torch(*batch.args("cpu")), batch)
    torch.testing.assert_close(paged_attention_torch(*batch.args("cpu")), expected)
    if max(q_lens) == 1:
        plan = plan_decode(batch.kv_layer, batch.block_tables, batch.seq_lens, max(seq_lens))
        assert_close(paged_decode_torch(batch.q, batch.kv_layer, plan, batch.scale), batch)


def test_store_kv_into_a_layer_group_cache_leaves_other_layers() -> None:
    slots, key, value, expected = _store_case()
    num_blocks, _, bs, hkv, d = expected.shape
    cache = torch.zeros(2, num_blocks, 4, 2, bs, hkv, d)  # [G, N, g, 2, bs, Hkv, D]
    store_kv_torch(key, value, kv_layer(cache, 6), slots)
    assert torch.equal(kv_layer(cache, 6), expected)
    assert int(torch.count_nonzero(cache)) == int(torch.count_nonzero(expected))
