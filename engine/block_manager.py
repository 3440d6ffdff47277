"""The block manager: which KV cache blocks each request owns, and the prefix cache.

Pure Python, no torch: it hands out block ids; the cache tensor lives elsewhere.

- Every block has a reference count. A block with refcount 0 sits in the free list, an O(1)
  LRU (`OrderedDict`) whose order is the eviction order: the front is evicted first.
- A block whose KV is complete can be *committed* under its chained `BlockHash`; it then stays
  findable in the prefix cache, even while free, until the free list hands it out again
  (eviction). Blocks without a hash go to the front of the free list when freed (nothing to
  keep); hashed ones go to the back, tail blocks of a request first, so a request's last
  blocks are evicted before its first (a shared prefix outlives its suffixes).
- Running out of blocks is not an exception: `allocate` and `append_slots` return None/False
  and the caller decides (queue, preempt, reject).
- Each cached block keeps its token ids: a hash hit whose tokens differ (a collision) counts as
  a miss and is reported in `stats.hash_collisions`.
- Changes to the prefix cache are recorded as `BlockEvent`s for the cluster's prefix index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from engine.block_hash import BlockHash


class Allocation(NamedTuple):
    """Result of `allocate`: the request's block table and how much of it was already cached."""

    block_ids: list[int]
    num_cached_tokens: int


@dataclass(frozen=True)
class BlockEvent:
    """A change to the prefix cache, for the cluster's prefix index (in order)."""

    kind: Literal["stored", "evicted"]
    block_hash: BlockHash


@dataclass
class BlockManagerStats:
    """Counters a worker exports as metrics."""

    prefix_queries_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, tokens found cached
    hash_collisions: int = 0
    evictions: int = 0


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()  # kept for the collision guard while hashed


@dataclass
class BlockManager:
    """Allocates paged-cache blocks to requests and keeps the prefix cache."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    stats: BlockManagerStats = field(default_factory=BlockManagerStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {self.num_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        self._blocks = [_Block(i) for i in range(self.num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))
        self._cached: dict[BlockHash, int] = {}  # hash → block id
        self._req_blocks: dict[str, list[int]] = {}
        self._req_num_hashed: dict[str, int] = {}  # leading blocks of the request already hashed
        self._events: list[BlockEvent] = []

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, including evictable cached ones)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def has_request(self, request_id: str) -> bool:
        return request_id in self._req_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self._req_blocks[request_id]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash currently in the prefix cache (to re-publish the full state)."""
        return list(self._cached)

    def match_prefix(self, block_hashes: Sequence[BlockHash],
                     token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of a prompt (takes no references).

        At most `(len(token_ids) - 1) // block_size` blocks match: the last prompt token is
        always computed so the model produces logits for it.
        """
        if not self.enable_prefix_caching:
            return []
        limit = min(len(block_hashes), (len(token_ids) - 1) // self.block_size)
        hits: list[int] = []
        for i in range(limit):
            block_id = self._cached.get(block_hashes[i])
            if block_id is None:
                break
            block = self._blocks[block_id]
            start = i * self.block_size
            if block.token_ids != tuple(token_ids[start:start + self.block_size]):
                self.stats.hash_collisions += 1
                break
            hits.append(block_id)
        return hits

    # ---- allocation ----------------------------------------------------------------------

    def allocate(self, request_id: str, token_ids: Sequence[int],
                 block_hashes: Sequence[BlockHash], num_tokens: int | None = None,
                 ) -> Allocation | None:
        """Gives a new request blocks for `num_tokens` tokens (default: all of `token_ids`).

        Reuses cached prefix blocks (shared, refcount + 1). Returns None, changing nothing,
        when the free list cannot cover the rest.
        """
        if request_id in self._req_blocks:
            raise ValueError(f"request_id: {request_id!r} already holds blocks")
        num_tokens = len(token_ids) if num_tokens is None else num_tokens
        hits = self.match_prefix(block_hashes, token_ids)
        num_new = self.blocks_needed(num_tokens) - len(hits)
        hits_in_free = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if num_new > len(self._free) - hits_in_free:
            return None
        for block_id in hits:
            self._take(block_id)
        new_ids = [self._pop_free() for _ in range(max(num_new, 0))]
        blocks = hits + new_ids
        self._req_blocks[request_id] = blocks
        self._req_num_hashed[request_id] = len(hits)
        self.stats.prefix_queries_tokens += len(token_ids)
        self.stats.prefix_hit_tokens += len(hits) * self.block_size
        return Allocation(list(blocks), len(hits) * self.block_size)

    def append_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grows a request's block table to hold `num_tokens` tokens; False if out of blocks."""
        blocks = self._req_blocks[request_id]
        num_new = self.blocks_needed(num_tokens) - len(blocks)
        if num_new > len(self._free):
            return False
        blocks.extend(self._pop_free() for _ in range(max(num_new, 0)))
        return True

    def commit(self, request_id: str, token_ids: Sequence[int],
               block_hashes: Sequence[BlockHash], num_computed_tokens: int) -> None:
        """Enters the request's blocks whose KV is now complete into the prefix cache.

        `token_ids` / `block_hashes` cover the request's tokens so far (prompt, then output);
        only full blocks within `num_computed_tokens` are committed. A hash already cached
        under another block (two requests computed the same prefix at once) is left there.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self._req_blocks[request_id]
        num_full = min(num_computed_tokens // self.block_size, len(block_hashes), len(blocks))
        for i in range(self._req_num_hashed[request_id], num_full):
            block = self._blocks[blocks[i]]
            block_hash = block_hashes[i]
            if block.block_hash is None and block_hash not in self._cached:
                start = i * self.block_size
                block.block_hash = block_hash
                block.token_ids = tuple(token_ids[start:start + self.block_size])
                self._cached[block_hash] = block.block_id
                self._events.append(BlockEvent("stored", block_hash))
        self._req_num_hashed[request_id] = max(self._req_num_hashed[request_id], num_full)

    def free(self, request_id: str) -> None:
        """Releases every block of a request (exactly once; unknown ids are a no-op)."""
        blocks = self._req_blocks.pop(request_id, None)
        self._req_num_hashed.pop(request_id, None)
        if blocks is None:
            return
        for block_id in reversed(blocks):  # tail first: evicted before the shared prefix
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def rename(self, request_id: str, new_id: str) -> None:
        """Moves a request's blocks to another owner id (e.g. to hold them in quarantine while
        the request id is reused)."""
        if new_id in self._req_blocks:
            raise ValueError(f"request_id: {new_id!r} already holds blocks")
        self._req_blocks[new_id] = self._req_blocks.pop(request_id)
        self._req_num_hashed[new_id] = self._req_num_hashed.pop(request_id)

    def drain_events(self) -> list[BlockEvent]:
        """Prefix-cache changes since the last call, in order."""
        events, self._events = self._events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash (blocks in use stay allocated)."""
        for block_hash, block_id in list(self._cached.items()):
            self._evict(self._blocks[block_id], block_hash)

    # ---- internals -----------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.block_hash is not None:
            self._evict(block, block.block_hash)
            self.stats.evictions += 1
        block.ref_count = 1
        return block_id

    def _evict(self, block: _Block, block_hash: BlockHash) -> None:
        del self._cached[block_hash]
        block.block_hash = None
        block.token_ids = ()
        self._events.append(BlockEvent("evicted", block_hash))
