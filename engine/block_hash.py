"""The one block-hash function of the cluster, shared by the router and both workers.

A prompt is cut into full blocks of `block_size` tokens; block i's hash chains over
(hash of block i-1, the token ids of block i, extra keys such as a cache salt):

    h_0 = XXH3-128(ROOT(seed) ‖ tokens_0 ‖ extra, seed)
    h_i = XXH3-128(h_{i-1} ‖ tokens_i ‖ extra, seed)

with hashes as 16 little-endian bytes, token ids as little-endian uint32, and `extra` prefixed
by its length. The seed is fixed in config (never process-random), so every process on every
machine computes the same chain. Because each hash covers its whole prefix, a lookup that stops
at the first unknown hash always matches a contiguous prefix. A partial last block has no hash.

This module imports neither torch nor numpy: the router uses it.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import NewType

import xxhash

BlockHash = NewType("BlockHash", int)
"""A 128-bit chained block hash (an int in [0, 2**128))."""

DEFAULT_HASH_SEED = 0x7A4E_DE11  # any fixed value: it must only agree across the cluster

_HASH_BYTES = 16


def _root(seed: int) -> bytes:
    """The stand-in 'parent' of the first block: derived from the seed, never random."""
    return xxhash.xxh3_128_digest(b"tandem-root", seed=seed)


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array("I", token_ids)  # uint32: vocabularies stay far below 2**32
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"",
               seed: int = DEFAULT_HASH_SEED) -> BlockHash:
    """Hash of one block given its parent's hash (None for the first block)."""
    prefix = _root(seed) if parent is None else parent.to_bytes(_HASH_BYTES, "little")
    payload = prefix + _token_bytes(token_ids) + len(extra).to_bytes(4, "little") + extra
    return BlockHash(xxhash.xxh3_128_intdigest(payload, seed=seed))


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int, extra: bytes = b"",
                       seed: int = DEFAULT_HASH_SEED) -> list[BlockHash]:
    """Chained hashes of every *full* block of `token_ids`, in order."""
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra, seed)
        hashes.append(parent)
    return hashes


def hash_to_hex(block_hash: BlockHash) -> str:
    """Fixed-width hex form, as stored in Redis and sent in events."""
    return f"{block_hash:032x}"


def hash_from_hex(text: str) -> BlockHash:
    return BlockHash(int(text, 16))
