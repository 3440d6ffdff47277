"""DecodeMirror: steady decode steps append to a dense copy and attend exactly as a gather does."""

from __future__ import annotations

import torch

from engine.kernels import store_kv_torch
from engine.kernels.attention import paged_decode_torch, plan_decode
from engine.kernels.decode_mirror import HEADROOM, DecodeMirror

BS, HKV, HQ, D, NUM_BLOCKS = 4, 2, 4, 8, 64


class Batch:
    """A decode batch over a random one-layer cache; `step()` adds one token per sequence."""

    def __init__(self, seq_lens: list[int], cache_dtype: torch.dtype, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.cache_dtype = cache_dtype
        self.kv_layer = torch.randn(NUM_BLOCKS, 2, BS, HKV, D, generator=self.gen).to(
            cache_dtype)  # [N, 2, bs, Hkv, D]
        free = torch.randperm(NUM_BLOCKS, generator=self.gen).tolist()
        self.tables = [[free.pop() for _ in range(NUM_BLOCKS // len(seq_lens))]
                       for _ in seq_lens]
        self.seq_lens = list(seq_lens)
        self.ids = tuple(f"r{i}" for i in range(len(seq_lens)))

    @property
    def block_tables(self) -> torch.Tensor:
        width = max(-(-n // BS) for n in self.seq_lens)
        return torch.tensor([t[:width] for t in self.tables], dtype=torch.int32)  # [S, nb]

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One more token each: its K/V stored in the cache; returns q, k, v (cache values)."""
        self.seq_lens = [n + 1 for n in self.seq_lens]
        slots = torch.tensor([t[(n - 1) // BS] * BS + (n - 1) % BS
                              for t, n in zip(self.tables, self.seq_lens, strict=True)])  # [S]
        num = len(self.seq_lens)
        k, v = torch.randn(2, num, HKV, D, generator=self.gen).to(self.cache_dtype)
        store_kv_torch(k, v, self.kv_layer, slots)
        q = torch.randn(num, HQ, D, generator=self.gen)  # [S, Hq, D] float32
        return q, k.float(), v.float()

    def expected(self, q: torch.Tensor) -> torch.Tensor:
        lens = torch.tensor(self.seq_lens, dtype=torch.int32)
        plan = plan_decode(self.kv_layer, self.block_tables, lens, max(self.seq_lens))
        return paged_decode_torch(q, self.kv_layer, plan, D**-0.5)  # [S, Hq, D]

    def mirrored(self, mirror: DecodeMirror, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor | None:
        step = mirror.begin(self.ids, self.seq_lens, self.kv_layer, self.block_tables, 1,
                            torch.float32)
        if step is None:
            return None
        return mirror.attend(step, 0, q, k, v, self.kv_layer, D**-0.5)


def run_steps(batch: Batch, mirror: DecodeMirror, steps: int) -> list[bool]:
    """Runs decode steps; each must equal the gather's result. Returns which were mirrored."""
    used = []
    for _ in range(steps):
        q, k, v = batch.step()
        got = batch.mirrored(mirror, q, k, v)
        used.append(got is not None)
        if got is not None:
            torch.testing.assert_close(got, batch.expected(q), rtol=0, atol=0)
    return used


def test_steady_steps_append_and_match_the_gather_exactly() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        batch, mirror = Batch([3, 9, 14], dtype), DecodeMirror()
        used = run_steps(batch, mirror, 12)
        assert used == [False] + [True] * 11  # the first step of a batch gathers as usual
        assert mirror.gathers == 1  # one gather with headroom, then appends


def test_running_out_of_headroom_gathers_again() -> None:
    batch, mirror = Batch([2, 5], torch.float32), DecodeMirror()
    used = run_steps(batch, mirror, HEADROOM + 4)
    assert all(used[1:]) and mirror.gathers == 2


def test_any_change_to_the_batch_drops_the_mirror() -> None:
    batch, mirror = Batch([3, 9, 14], torch.float32), DecodeMirror()
    run_steps(batch, mirror, 3)
    batch.ids = ("r0", "r1", "other")  # a different request in the same place
    assert run_steps(batch, mirror, 2) == [False, True]
    mirror.forget()  # a prefill or mixed forward pass in between
    assert run_steps(batch, mirror, 2) == [False, True]
    batch.tables[1][0], batch.tables[1][-1] = batch.tables[1][-1], batch.tables[1][0]
    assert run_steps(batch, mirror, 2) == [False, True]  # a block that was read moved
    q, k, v = batch.step()
    batch.seq_lens[0] += 1  # not exactly one more token
    assert batch.mirrored(mirror, q, k, v) is None


def test_a_batch_over_the_byte_budget_just_gathers() -> None:
    batch, mirror = Batch([3, 9, 14], torch.float32), DecodeMirror(max_bytes=1024)
    assert run_steps(batch, mirror, 4) == [False] * 4
