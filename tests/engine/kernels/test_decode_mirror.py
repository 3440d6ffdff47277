"""DecodeMirror: decode steps keep, append, move and gather rows, and attend exactly as a gather."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.kernels import store_kv_torch
from engine.kernels.attention import paged_decode_torch, plan_decode
from engine.kernels.decode_mirror import HEADROOM, DecodeMirror

BS, HKV, HQ, D, NUM_BLOCKS, MAX_BLOCKS = 4, 2, 4, 8, 1280, 24


class Cache:
    """A one-layer cache and running requests; `step(ids)` decodes one token for each."""

    def __init__(self, cache_dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.cache_dtype = cache_dtype
        self.kv_layer = torch.randn(NUM_BLOCKS, 2, BS, HKV, D, generator=self.gen).to(
            cache_dtype)  # [N, 2, bs, Hkv, D]
        self.free = torch.randperm(NUM_BLOCKS, generator=self.gen).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def add(self, rid: str, length: int) -> None:
        """A request holding `length` tokens (random K/V already in its blocks)."""
        self.tables[rid] = [self.free.pop() for _ in range(MAX_BLOCKS)]
        self.lens[rid] = length

    def step(self, ids: list[str], mirror: DecodeMirror) -> bool:
        """One decode step of `ids` (in that batch order); checks the mirror against a gather.

        Returns whether the mirror served it."""
        for rid in ids:
            self.lens[rid] += 1
        lens = [self.lens[r] for r in ids]
        slots = torch.tensor([self.tables[r][(n - 1) // BS] * BS + (n - 1) % BS
                              for r, n in zip(ids, lens, strict=True)])  # [S]
        k, v = torch.randn(2, len(ids), HKV, D, generator=self.gen).to(self.cache_dtype)
        store_kv_torch(k, v, self.kv_layer, slots)
        q = torch.randn(len(ids), HQ, D, generator=self.gen)  # [S, Hq, D] float32
        width = max(-(-n // BS) for n in lens)
        tables = torch.tensor([self.tables[r][:width] for r in ids], dtype=torch.int32)
        plan = plan_decode(self.kv_layer, tables, torch.tensor(lens, dtype=torch.int32),
                           max(lens))
        expected = paged_decode_torch(q, self.kv_layer, plan, D**-0.5)  # [S, Hq, D]
        step = mirror.begin(ids, lens, self.kv_layer, tables, 1, torch.float32)
        if step is None:
            return False
        got = mirror.attend(step, 0, q, k.float(), v.float(), self.kv_layer, D**-0.5)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # other order: ulps
        return True


def counts(mirror: DecodeMirror) -> tuple[int, int]:
    return mirror.gathered_rows, mirror.appended_rows


def test_a_steady_batch_gathers_once_then_appends() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        cache, mirror = Cache(dtype), DecodeMirror()
        ids = ["a", "b", "c"]
        for rid, n in zip(ids, (3, 9, 14), strict=True):
            cache.add(rid, n)
        assert all(cache.step(ids, mirror) for _ in range(12))
        assert counts(mirror) == (3, 3 * 11)


def test_requests_leaving_joining_and_reordering_keep_the_others() -> None:
    cache, mirror = Cache(), DecodeMirror()
    for rid, n in zip("abcdef", (3, 9, 14, 5, 20, 7), strict=True):
        cache.add(rid, n)
    assert cache.step(list("abcde"), mirror)  # 5 gathered
    assert cache.step(list("acde"), mirror)  # b left: e moves into its slot
    assert cache.step(list("acdef"), mirror)  # f joins
    assert cache.step(list("fedca"), mirror)  # another order
    assert cache.step(list("fa"), mirror)  # most leave
    assert counts(mirror) == (6, 4 + 4 + 5 + 2)


def test_fresh_memory_content_never_leaks_into_attention(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Masked positions are still read: the mirror must not rely on what new memory holds."""
    real_empty = torch.empty

    def nan_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    cache, mirror = Cache(), DecodeMirror()
    for rid, n in zip("abc", (30, 3, 9), strict=True):
        cache.add(rid, n)
    assert cache.step(list("ab"), mirror)  # b's slot: 4 positions of 35 written
    assert cache.step(list("abc"), mirror)  # c joins: 10 of its slot's positions written


def test_rows_that_do_not_match_are_gathered_again() -> None:
    cache, mirror = Cache(), DecodeMirror()
    for rid, n in zip("abc", (3, 9, 14), strict=True):
        cache.add(rid, n)
    cache.step(list("abc"), mirror)
    cache.tables["b"][0], cache.tables["b"][1] = cache.tables["b"][1], cache.tables["b"][0]
    assert cache.step(list("abc"), mirror)  # a block b had read moved: b is gathered again
    cache.lens["c"] += 1  # c skipped a token (a step the mirror did not see)
    assert cache.step(list("abc"), mirror)
    assert counts(mirror) == (3 + 1 + 1, 2 + 2)
    mirror.forget()  # a prefill or mixed forward pass in between
    assert cache.step(list("abc"), mirror)
    assert counts(mirror) == (3 + 1 + 1 + 3, 2 + 2)


def test_running_out_of_width_or_slots_starts_over() -> None:
    cache, mirror = Cache(), DecodeMirror()
    cache.add("a", 2)
    cache.add("b", 5)
    assert all(cache.step(["a", "b"], mirror) for _ in range(HEADROOM + 2))
    assert mirror.gathered_rows == 4  # the longest outgrew the headroom once
    many = [f"r{i}" for i in range(40)]  # more than the 32 slots first allocated
    for rid in many:
        cache.add(rid, 3)
    assert cache.step(["a", "b", *many], mirror)
    assert mirror.gathered_rows == 4 + 42


def test_a_batch_over_the_byte_budget_just_gathers() -> None:
    cache, mirror = Cache(), DecodeMirror(max_bytes=1024)
    cache.add("a", 3)
    assert not cache.step(["a"], mirror)
    assert DecodeMirror(max_bytes=0).begin(["a"], [4], cache.kv_layer,
                                            torch.zeros(1, 1, dtype=torch.int32), 1,
                                            torch.float32) is None
