"""The Redis prefix index against a real redis-server: ordered batches, contiguous lookups."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, cast

from redis.asyncio import Redis

from engine.block_hash import BlockHash, hash_prompt_blocks, hash_to_hex
from index.prefix_index import PrefixIndexReader, PrefixIndexWriter
from index.prefix_keys import PrefixKeys
from index.redis_client import RedisConfig

BLOCK = 4
PROMPT = list(range(1000, 1000 + 40 * BLOCK))  # 40 full blocks
HASHES = hash_prompt_blocks(PROMPT, BLOCK)


async def _writer(redis: Redis, config: RedisConfig, worker: str,
                  blocks: list[BlockHash], **kwargs: int) -> PrefixIndexWriter:
    writer = PrefixIndexWriter(redis, config, worker, **kwargs)
    await writer.start()
    writer.stored(blocks)
    await writer.flush()
    return writer


async def test_events_are_published_in_order_in_batches(redis_client: Redis,
                                                       redis_config: RedisConfig) -> None:
    writer = PrefixIndexWriter(redis_client, redis_config, "p0", max_batch=3)
    await writer.start()
    a, b, c, d = HASHES[:4]
    writer.stored([a, b, c])
    writer.evicted([b])
    writer.stored([d])
    assert writer.pending == 5
    assert await writer.flush() == 5
    assert writer.pending == 0

    entries: list[tuple[bytes, dict[bytes, bytes]]] = cast(
        Any, await redis_client.xrange(PrefixKeys(redis_config.namespace).events("p0")))
    reset, first, second = (fields for _, fields in entries)
    assert reset[b"reset"] == b"1" and reset[b"seq"] == b"1"
    assert [first[b"seq"], second[b"seq"]] == [b"2", b"3"]
    ops = (first[b"ops"] + b"," + second[b"ops"]).decode().split(",")
    assert ops == [f"+{hash_to_hex(a)}", f"+{hash_to_hex(b)}", f"+{hash_to_hex(c)}",
                   f"-{hash_to_hex(b)}", f"+{hash_to_hex(d)}"]
    assert writer.seq == 3
    assert await PrefixIndexReader(redis_client, redis_config).worker_blocks("p0") == {a, c, d}


async def test_lookup_returns_contiguous_prefix_per_worker(redis_client: Redis,
                                                          redis_config: RedisConfig) -> None:
    await _writer(redis_client, redis_config, "full", HASHES[:10])
    await _writer(redis_client, redis_config, "gap", HASHES[:4] + HASHES[5:10])
    await _writer(redis_client, redis_config, "no-first", HASHES[1:10])
    await _writer(redis_client, redis_config, "all", HASHES)
    reader = PrefixIndexReader(redis_client, redis_config)
    assert await reader.lookup(HASHES) == {"full": 10, "gap": 4, "all": 40}
    assert await reader.lookup(HASHES, workers={"gap", "no-first"}) == {"gap": 4}
    assert await reader.lookup(HASHES, workers=set()) == {}
    assert await reader.lookup([]) == {}


async def test_lookup_stops_at_first_chunk_with_a_miss_for_everyone(
        redis_client: Redis, redis_config: RedisConfig) -> None:
    await _writer(redis_client, redis_config, "p0", HASHES[:7])
    reader = PrefixIndexReader(redis_client, redis_config, first_chunk=2, max_chunk=8)
    assert await reader.lookup(HASHES) == {"p0": 7}
    assert reader.round_trips == 3  # chunks [0,2) [2,6) [6,14): block 7 misses in the third

    reader.round_trips = 0
    other = hash_prompt_blocks(list(range(40 * BLOCK)), BLOCK)
    assert await reader.lookup(other) == {}
    assert reader.round_trips == 1

    reader.round_trips = 0
    assert await reader.lookup(HASHES[:7]) == {"p0": 7}
    assert reader.round_trips == 3  # 2 + 4 + 1: the whole prompt matched


async def test_evictions_remove_blocks(redis_client: Redis, redis_config: RedisConfig) -> None:
    writer = await _writer(redis_client, redis_config, "d0", HASHES[:10])
    reader = PrefixIndexReader(redis_client, redis_config)
    writer.evicted([HASHES[6]])
    await writer.flush()
    assert await reader.lookup(HASHES) == {"d0": 6}
    writer.evicted([HASHES[0]])
    await writer.flush()
    assert await reader.lookup(HASHES) == {}
    assert HASHES[0] not in await reader.worker_blocks("d0")


async def test_start_wipes_a_crashed_predecessors_state(redis_client: Redis,
                                                       redis_config: RedisConfig) -> None:
    await _writer(redis_client, redis_config, "p0", HASHES[:10])  # then "crashes"
    successor = await _writer(redis_client, redis_config, "p0", HASHES[:2])
    reader = PrefixIndexReader(redis_client, redis_config)
    assert await reader.lookup(HASHES) == {"p0": 2}
    await successor.remove()
    assert await reader.lookup(HASHES) == {}
    assert await reader.worker_blocks("p0") == set()
    assert not await redis_client.exists(PrefixKeys(redis_config.namespace).block(
        hash_to_hex(HASHES[0])))


async def _stream_seqs(redis: Redis, config: RedisConfig, worker: str) -> list[bytes]:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = cast(
        Any, await redis.xrange(PrefixKeys(config.namespace).events(worker)))
    return [fields[b"seq"] for _, fields in entries]


async def test_run_publishes_the_first_event_at_once_then_batches_within_the_interval(
        redis_client: Redis, redis_config: RedisConfig) -> None:
    """The loop sleeps until an event comes (no flush_interval wait for it), then publishes at
    most once per flush_interval: what arrives meanwhile goes out as one batch."""
    writer = PrefixIndexWriter(redis_client, redis_config, "w0")
    await writer.start()
    task = asyncio.create_task(writer.run(flush_interval_s=3.0, epoch_check_interval_s=60.0))
    try:
        await asyncio.sleep(0.2)  # the loop's first round is over: it waits for events
        started = time.monotonic()
        writer.stored(HASHES[:1])
        while writer.seq < 2:  # the start's reset is seq 1
            assert time.monotonic() - started < 2.0, "the first event waited for the interval"
            await asyncio.sleep(0.01)
        writer.stored(HASHES[1:2])
        writer.stored(HASHES[2:3])
        await asyncio.sleep(0.3)
        assert writer.seq == 2 and writer.pending == 2  # held back until the interval ends
        while writer.seq < 3:
            assert time.monotonic() - started < 10.0, "the batch was never published"
            await asyncio.sleep(0.05)
        assert await _stream_seqs(redis_client, redis_config, "w0") == [b"1", b"2", b"3"]
        reader = PrefixIndexReader(redis_client, redis_config)
        assert await reader.lookup(HASHES) == {"w0": 3}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
