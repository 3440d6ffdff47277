"""Block manager: allocation, sharing, eviction order, refcounts, collisions, no leaks."""

from __future__ import annotations

import pytest

from engine.block_hash import BlockHash, hash_prompt_blocks
from engine.block_manager import BlockManager

BS = 4


def prompt(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def hashes(ids: list[int]) -> list[BlockHash]:
    return hash_prompt_blocks(ids, BS)


def allocate_and_commit(bm: BlockManager, rid: str, ids: list[int]) -> list[int]:
    alloc = bm.allocate(rid, ids, hashes(ids))
    assert alloc is not None
    bm.commit(rid, ids, hashes(ids), len(ids))
    return alloc.block_ids


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    alloc = bm.allocate("a", prompt(0, 10), hashes(prompt(0, 10)))
    assert alloc is not None and len(alloc.block_ids) == 3 and alloc.num_cached_tokens == 0
    assert bm.num_free_blocks == 5
    bm.free("a")
    assert bm.num_free_blocks == 8
    bm.free("a")  # a second free is a no-op, never a double release
    assert bm.num_free_blocks == 8


def test_allocate_returns_none_when_full_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    assert bm.allocate("a", prompt(0, 12), hashes(prompt(0, 12))) is not None
    assert bm.allocate("b", prompt(100, 8), hashes(prompt(100, 8))) is None
    assert bm.num_free_blocks == 1 and not bm.has_request("b")
    bm.free("a")
    assert bm.num_free_blocks == 4


def test_prefix_is_shared_with_refcounts() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    ids = prompt(0, 13)  # 3 full blocks + 1 token
    first = allocate_and_commit(bm, "a", ids)
    alloc = bm.allocate("b", ids, hashes(ids))
    assert alloc is not None
    assert alloc.block_ids[:3] == first[:3] and alloc.block_ids[3] != first[3]
    assert alloc.num_cached_tokens == 12
    bm.free("a")
    assert bm.num_used_blocks == 4  # b still holds the shared prefix and its own tail
    bm.free("b")
    assert bm.num_free_blocks == 16


def test_last_prompt_token_is_always_computed() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    ids = prompt(0, 8)  # exactly two full blocks
    allocate_and_commit(bm, "a", ids)
    alloc = bm.allocate("b", ids, hashes(ids))
    assert alloc is not None and alloc.num_cached_tokens == 4  # block 2 recomputed for logits
    bm.free("a")
    bm.free("b")


def test_free_cached_blocks_stay_findable_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a_ids = prompt(0, 9)  # blocks a0 a1 + tail
    a_blocks = allocate_and_commit(bm, "a", a_ids)
    bm.free("a")
    assert bm.num_free_blocks == 4
    # the unhashed tail block is reused first; the hashed ones stay cached
    c = bm.allocate("c", prompt(500, 3), hashes(prompt(500, 3)))
    assert c is not None and c.block_ids == [a_blocks[2]]
    again = bm.allocate("a2", a_ids, hashes(a_ids))
    assert again is not None and again.num_cached_tokens == 8
    bm.free("a2")
    bm.free("c")
    # now fill the cache with other tokens: a's blocks are evicted, tail (a1) before head (a0)
    bm.drain_events()
    d = bm.allocate("d", prompt(900, 4 * BS), hashes(prompt(900, 4 * BS)))
    assert d is not None
    evicted = [e.block_hash for e in bm.drain_events() if e.kind == "evicted"]
    assert evicted == [hashes(a_ids)[1], hashes(a_ids)[0]]
    bm.free("d")
    assert bm.num_free_blocks == 4


def test_events_are_ordered_stored_then_evicted() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    ids = prompt(0, 9)
    assert bm.allocate("a", ids, hashes(ids)) is None  # needs 3 blocks: nothing happens
    ids = prompt(0, 5)
    allocate_and_commit(bm, "a", ids)
    events = bm.drain_events()
    assert [(e.kind, e.block_hash) for e in events] == [("stored", hashes(ids)[0])]
    bm.free("a")
    allocate_and_commit(bm, "b", prompt(50, 8))
    kinds = [e.kind for e in bm.drain_events()]
    assert kinds == ["evicted", "stored", "stored"]
    bm.free("b")
    assert bm.num_free_blocks == 2


def test_collision_guard_treats_mismatched_tokens_as_miss() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    ids = prompt(0, 9)
    allocate_and_commit(bm, "a", ids)
    other = prompt(300, 9)
    forged = hashes(ids)  # pretend other's blocks hash like a's (a collision)
    alloc = bm.allocate("b", other, forged)
    assert alloc is not None and alloc.num_cached_tokens == 0
    assert bm.stats.hash_collisions == 1
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8


def test_append_slots_grows_and_refuses_when_full() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    assert bm.allocate("a", prompt(0, 4), hashes(prompt(0, 4))) is not None
    assert bm.append_slots("a", 5) and len(bm.block_ids("a")) == 2
    assert bm.append_slots("a", 12) and len(bm.block_ids("a")) == 3
    assert not bm.append_slots("a", 13)
    assert len(bm.block_ids("a")) == 3
    bm.free("a")
    assert bm.num_free_blocks == 3


def test_duplicate_concurrent_prefix_is_cached_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    ids = prompt(0, 9)
    assert bm.allocate("a", ids, hashes(ids)) is not None
    assert bm.allocate("b", ids, hashes(ids)) is not None  # neither is committed yet
    bm.commit("a", ids, hashes(ids), 9)
    bm.commit("b", ids, hashes(ids), 9)
    assert len(bm.cached_hashes()) == 2
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8


def test_prefix_caching_off_never_matches() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    ids = prompt(0, 9)
    allocate_and_commit(bm, "a", ids)
    alloc = bm.allocate("b", ids, hashes(ids))
    assert alloc is not None and alloc.num_cached_tokens == 0
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8


def test_double_allocate_same_request_is_an_error() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.allocate("a", prompt(0, 3), []) is not None
    with pytest.raises(ValueError, match="request_id"):
        bm.allocate("a", prompt(0, 3), [])
    bm.free("a")


def test_bad_sizes_name_the_field() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)


def test_rename_moves_ownership_so_the_id_can_be_reused() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    first = bm.allocate("a", prompt(0, 8), hashes(prompt(0, 8)))
    assert first is not None
    bm.rename("a", "held")
    assert not bm.has_request("a") and bm.block_ids("held") == first.block_ids
    again = bm.allocate("a", prompt(50, 8), hashes(prompt(50, 8)))
    assert again is not None and set(again.block_ids).isdisjoint(first.block_ids)
    with pytest.raises(ValueError, match="request_id"):
        bm.rename("a", "held")
    bm.free("held")
    bm.free("a")
    assert bm.num_free_blocks == 8
