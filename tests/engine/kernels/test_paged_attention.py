"""paged_attention (torch and Triton paths) against a naive float64 reference."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from engine.kernels import (
    BACKEND_ENV,
    paged_attention,
    paged_attention_torch,
    paged_attention_triton,
    store_kv_triton,
)
from tests.support.device import device_under_test

DEVICE = str(device_under_test())  # TANDEM_TEST_DEVICE
TRITON_DEVICE = DEVICE  # CPU means the Triton interpreter (conftest.py)
AttentionFn = Callable[..., torch.Tensor]
BACKENDS: dict[str, AttentionFn] = {"torch": paged_attention_torch,
                                    "triton": paged_attention_triton}
PAD_IDS = (-1, 2**30, 7)  # padding entries in block tables: invalid, huge, and a real block


def naive_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Token by token, in float64, on K/V gathered one slot at a time."""
    num_heads, num_kv_heads = q.shape[1], kv_layer.shape[3]
    block_size = kv_layer.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)  # [T, Hq, D]
    for s in range(seq_lens.shape[0]):
        seq_len = int(seq_lens[s])
        start, end = int(query_start_loc[s]), int(query_start_loc[s + 1])
        slots = [(int(block_tables[s, p // block_size]), p % block_size) for p in range(seq_len)]
        k = torch.stack([kv_layer[b, 0, o] for b, o in slots]).double()  # [L, Hkv, D]
        v = torch.stack([kv_layer[b, 1, o] for b, o in slots]).double()  # [L, Hkv, D]
        for i in range(end - start):
            pos = seq_len - (end - start) + i
            for h in range(num_heads):
                kv_head = h // (num_heads // num_kv_heads)
                scores = k[: pos + 1, kv_head] @ q[start + i, h].double() * scale  # [pos+1]
                out[start + i, h] = torch.softmax(scores, 0) @ v[: pos + 1, kv_head]
    return out


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    kv_layer: torch.Tensor  # [N, 2, bs, Hkv, D]
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_start_loc: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    scale: float
    max_query_len: int
    max_seq_len: int

    def args(self, device: str) -> tuple[Any, ...]:
        return (self.q.to(device), self.kv_layer.to(device), self.block_tables.to(device),
                self.query_start_loc.to(device), self.seq_lens.to(device), self.scale,
                self.max_query_len, self.max_seq_len)


def make_batch(q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0) -> Batch:
    """Random batch whose sequences own shuffled, non-contiguous blocks of a bigger cache.

    Unowned memory holds large finite garbage, so any read of it shows up in the output; block
    tables are padded with invalid ids, which must never be dereferenced.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = 2 * sum(needed) + 3
    kv_layer = (100 * torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim,
                                  generator=gen)).to(dtype)  # garbage everywhere first
    ids = torch.randperm(num_blocks, generator=gen)[: sum(needed)].tolist()  # holes, shuffled
    max_blocks = max(needed) + 2
    block_tables = torch.empty(len(seq_lens), max_blocks, dtype=torch.int32)
    for s, n in enumerate(needed):
        row = ids[:n] + [PAD_IDS[(s + j) % len(PAD_IDS)] for j in range(max_blocks - n)]
        ids = ids[n:]
        block_tables[s] = torch.tensor(row, dtype=torch.int32)
        for p in range(seq_lens[s]):  # real K/V in the owned slots
            kv_layer[row[p // block_size], :, p % block_size] = torch.randn(
                2, num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    return Batch(q, kv_layer, block_tables, starts, torch.tensor(seq_lens, dtype=torch.int32),
                 head_dim**-0.5, max(q_lens), max(seq_lens))


def assert_close(out: torch.Tensor, batch: Batch) -> None:
    ref = naive_attention(batch.q, batch.kv_layer, batch.block_tables, batch.query_start_loc,
                          batch.seq_lens, batch.scale)
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    tol = 1e-4 if batch.q.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)


# (q_lens, seq_lens, Hq, Hkv, D, block_size, dtype)
CASES = {
    "decode-mha": ([1, 1, 1], [5, 17, 9], 4, 4, 16, 4, torch.float32),
    "decode-gqa-bf16": ([1, 1, 1, 1], [33, 1, 16, 20], 8, 4, 32, 16, torch.bfloat16),
    "decode-single": ([1], [23], 8, 1, 32, 4, torch.float32),
    "prefill-fresh": ([20, 7], [20, 7], 8, 4, 32, 16, torch.float32),
    "prefill-fresh-single-bf16": ([19], [19], 8, 4, 16, 4, torch.bfloat16),
    "prefill-prefix-mqa-bf16": ([6, 3], [21, 10], 8, 1, 64, 4, torch.bfloat16),
    "prefill-prefix-single": ([5], [30], 4, 4, 32, 16, torch.float32),
    "mixed": ([1, 9, 1, 12, 1], [13, 9, 30, 20, 4], 8, 4, 32, 4, torch.float32),
    "mixed-bf16": ([1, 17, 3], [40, 17, 8], 8, 1, 16, 16, torch.bfloat16),
    "mixed-one-decode": ([1, 6], [11, 6], 4, 2, 32, 4, torch.float32),
    "decode-gqa-fp16": ([1, 1], [19, 5], 8, 2, 32, 16, torch.float16),
    "prefill-prefix-fp16": ([7, 1], [15, 9], 4, 2, 64, 4, torch.float16),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive_reference(backend: str, case: str) -> None:
    q_lens, seq_lens, hq, hkv, d, bs, dtype = CASES[case]
    batch = make_batch(q_lens, seq_lens, hq, hkv, d, bs, dtype)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    out = BACKENDS[backend](*batch.args(device))
    assert_close(out, batch)


def test_triton_never_reads_unowned_slots() -> None:
    """NaN in every slot a sequence does not own (tails of last blocks included) stays out."""
    batch = make_batch([1, 4, 1], [6, 9, 3], 4, 2, 16, 4, torch.float32)
    poisoned = torch.full_like(batch.kv_layer, float("nan"))
    for s, seq_len in enumerate(batch.seq_lens.tolist()):
        for p in range(seq_len):
            b, o = int(batch.block_tables[s, p // 4]), p % 4
            poisoned[b, :, o] = batch.kv_layer[b, :, o]
    batch.kv_layer = poisoned
    out = paged_attention_triton(*batch.args(TRITON_DEVICE))
    assert_close(out, batch)


def test_torch_path_handles_strided_inputs() -> None:
    """q sliced out of a fused qkv projection, and a non-contiguous cache view."""
    batch = make_batch([1, 5], [9, 12], 4, 2, 16, 4, torch.float32)
    qkv = torch.cat([batch.q, torch.randn_like(batch.q)], dim=1)  # [T, 2*Hq, D]
    strided_cache = torch.cat([batch.kv_layer, batch.kv_layer], dim=-1)[..., :16]
    args = list(batch.args("cpu"))
    args[0], args[1] = qkv[:, :4], strided_cache
    assert_close(paged_attention_torch(*args), batch)


def test_dispatch_follows_device_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch([1, 3], [7, 3], 4, 2, 16, 4, torch.float32)
    calls: list[str] = []
    module = importlib.import_module("engine.kernels.attention")
    monkeypatch.setattr(module, "paged_attention_torch", lambda *a: calls.append("torch"))
    monkeypatch.setattr(module, "paged_attention_triton", lambda *a: calls.append("triton"))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    module.paged_attention(*batch.args("cpu"))
    monkeypatch.setenv(BACKEND_ENV, "triton")
    module.paged_attention(*batch.args("cpu"))
    monkeypatch.setenv(BACKEND_ENV, "torch")
    module.paged_attention(*batch.args("cpu"))
    assert calls == ["torch", "triton", "torch"]
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        module.paged_attention(*batch.args("cpu"))
    monkeypatch.delenv(BACKEND_ENV)
    assert paged_attention is module.paged_attention


def test_rejects_bad_arguments() -> None:
    batch = make_batch([1, 3], [7, 3], 4, 2, 16, 4, torch.float32)
    args = list(batch.args("cpu"))
    for i, bad in ((0, batch.q.to(torch.bfloat16)), (2, batch.block_tables.long()),
                   (3, batch.query_start_loc[:-1]), (0, batch.q[:, :3])):
        broken = list(args)
        broken[i] = bad
        for fn in BACKENDS.values():
            with pytest.raises(ValueError):
                fn(*broken)


def test_triton_large_block_ids_do_not_overflow_int32() -> None:
    """Block id * block stride > 2**31 elements: offsets must be computed in int64.

    bs=16, Hkv=8, D=128 -> 32,768 elements per block, so blocks past 65,536 start beyond
    2**31 elements. The cache is `torch.empty`, so only the pages written here are committed.
    """
    bs, hkv, hq, d = 16, 8, 8, 128
    num_blocks = 65_536 + 64
    kv_layer = torch.empty(num_blocks, 2, bs, hkv, d, dtype=torch.bfloat16, device=TRITON_DEVICE)
    assert kv_layer[-1].data_ptr() - kv_layer.data_ptr() > 2**31 * kv_layer.element_size()
    rss_before = _resident_bytes()
    seq_lens, q_lens = [21, 5], [3, 1]
    owned = [[num_blocks - 1, num_blocks - 7], [num_blocks - 3]]  # ids > 65,536, shuffled
    block_tables = torch.tensor([owned[0], [owned[1][0], -1]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([owned[s][p // bs] * bs + p % bs
                          for s in range(2) for p in range(seq_lens[s])])  # [21 + 5]
    key = torch.randn(len(slots), hkv, d, generator=gen).to(torch.bfloat16)  # [T, Hkv, D]
    value = torch.randn(len(slots), hkv, d, generator=gen).to(torch.bfloat16)  # [T, Hkv, D]
    store_kv_triton(key.to(TRITON_DEVICE), value.to(TRITON_DEVICE), kv_layer,
                    slots.to(TRITON_DEVICE))
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(torch.bfloat16)  # [4, Hq, D]
    batch = Batch(q, kv_layer, block_tables, torch.tensor([0, 3, 4], dtype=torch.int32),
                  torch.tensor(seq_lens, dtype=torch.int32), d**-0.5, 3, 21)
    out = paged_attention_triton(*batch.args(TRITON_DEVICE))
    if TRITON_DEVICE == "cpu":
        assert _resident_bytes() - rss_before < 256 * 2**20  # the 4 GiB cache stayed virtual
    # Reference from the K/V themselves (not via the cache), contiguous per sequence.
    dense = torch.zeros(2, 2, 2 * bs, hkv, d, dtype=torch.bfloat16)  # [S, k/v, nb*bs, Hkv, D]
    dense_tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    dense_cache = torch.zeros(4, 2, bs, hkv, d, dtype=torch.bfloat16)
    split = [0, seq_lens[0], sum(seq_lens)]
    for s in range(2):
        dense[s, 0, : seq_lens[s]] = key[split[s]:split[s + 1]]
        dense[s, 1, : seq_lens[s]] = value[split[s]:split[s + 1]]
        dense_cache[2 * s: 2 * s + 2] = dense[s].view(2, 2, bs, hkv, d).transpose(0, 1)
    ref_batch = Batch(q, dense_cache, dense_tables, batch.query_start_loc, batch.seq_lens,
                      batch.scale, 3, 21)
    assert_close(out, ref_batch)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_reference_is_sane() -> None:
    """The naive reference itself: one key means output == that value."""
    batch = make_batch([1], [1], 2, 1, 16, 4, torch.float32)
    ref = naive_attention(batch.q, batch.kv_layer, batch.block_tables, batch.query_start_loc,
                          batch.seq_lens, batch.scale)
    v = batch.kv_layer[int(batch.block_tables[0, 0]), 1, 0, 0].double()  # [D]
    assert torch.allclose(ref[0, 0], v) and torch.allclose(ref[0, 1], v)
    assert math.isclose(batch.scale, 0.25)
