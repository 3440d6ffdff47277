"""The writer's one-command publish (a Lua script) against a real redis-server: the same sets
and stream entries as the transaction it replaced, and a script Redis forgot is loaded again."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from redis.asyncio import Redis

from engine.block_hash import BlockHash, hash_prompt_blocks, hash_to_hex
from index.prefix_index import PrefixIndexWriter
from index.prefix_keys import PrefixKeys
from index.prefix_publish import MAX_BATCH
from index.redis_client import RedisConfig

BLOCK = 4
HASHES = hash_prompt_blocks(list(range(2000, 2000 + 8 * BLOCK)), BLOCK)


async def _holders(redis: Redis, keys: PrefixKeys, index: int) -> set[bytes]:
    return cast(set[bytes], await redis.smembers(keys.block(hash_to_hex(HASHES[index]))))


async def test_the_last_event_per_hash_wins_within_a_batch_and_across_batches(
        redis_client: Redis, redis_config: RedisConfig) -> None:
    keys = PrefixKeys(redis_config.namespace)
    writer = PrefixIndexWriter(redis_client, redis_config, "w0", max_batch=4)
    await writer.start()
    a, b, c, d = HASHES[:4]
    writer.stored([a, b])
    writer.evicted([a])
    writer.stored([a])  # batch 1: a stored, evicted, stored again; b stored
    writer.evicted([b])
    writer.stored([c, d])
    writer.evicted([d])  # batch 2: b evicted, c stored, d stored then evicted
    assert await writer.flush() == 8

    assert await redis_client.smembers(keys.worker_blocks("w0")) == {
        hash_to_hex(a).encode(), hash_to_hex(c).encode()}
    assert [await _holders(redis_client, keys, i) for i in range(4)] == [
        {b"w0"}, set(), {b"w0"}, set()]
    entries: list[tuple[bytes, dict[bytes, bytes]]] = cast(
        Any, await redis_client.xrange(keys.events("w0")))
    first, second = (fields for _, fields in entries[1:])  # after the start's reset
    assert (first[b"seq"], second[b"seq"]) == (b"2", b"3")
    assert first[b"inc"] == second[b"inc"] == writer.incarnation.encode()
    assert first[b"epoch"] == await redis_client.get(keys.epoch)
    assert first[b"ops"].decode().split(",") == [
        f"+{hash_to_hex(a)}", f"+{hash_to_hex(b)}", f"-{hash_to_hex(a)}", f"+{hash_to_hex(a)}"]


async def test_holders_of_one_block_from_two_workers(redis_client: Redis,
                                                    redis_config: RedisConfig) -> None:
    keys = PrefixKeys(redis_config.namespace)
    writers = [PrefixIndexWriter(redis_client, redis_config, w) for w in ("p", "q")]
    for writer in writers:
        await writer.start()
        writer.stored(HASHES[:2])
        await writer.flush()
    assert await _holders(redis_client, keys, 0) == {b"p", b"q"}
    writers[0].evicted(HASHES[:1])
    await writers[0].flush()
    assert await _holders(redis_client, keys, 0) == {b"q"}
    assert await _holders(redis_client, keys, 1) == {b"p", b"q"}


async def test_a_script_redis_forgot_is_loaded_again(redis_client: Redis,
                                                     redis_config: RedisConfig) -> None:
    keys = PrefixKeys(redis_config.namespace)
    writer = PrefixIndexWriter(redis_client, redis_config, "w0")
    await writer.start()
    writer.stored(HASHES[:1])
    await writer.flush()
    await redis_client.script_flush()  # as after a Redis restart: the script cache is empty
    writer.stored(HASHES[1:2])
    assert await writer.flush() == 1
    assert writer.publish_failures == 0
    assert len(await redis_client.smembers(keys.worker_blocks("w0"))) == 2


async def test_a_batch_of_the_largest_size_goes_through_the_script(
        redis_client: Redis, redis_config: RedisConfig) -> None:
    """Lua's `unpack` has a limit (~8,000 values): `MAX_BATCH` stays under it."""
    keys = PrefixKeys(redis_config.namespace)
    slow_ok = dataclasses.replace(redis_config, op_timeout_s=20.0)  # a loaded test machine
    writer = PrefixIndexWriter(redis_client, slow_ok, "w0", max_batch=MAX_BATCH)
    await writer.start()
    many = [BlockHash(i) for i in range(1, MAX_BATCH + 1)]
    writer.stored(many)
    assert await writer.flush() == MAX_BATCH
    assert writer.seq == 2  # the start's reset, then one full batch
    assert await redis_client.scard(keys.worker_blocks("w0")) == MAX_BATCH
    writer.evicted(many)
    await writer.flush()
    assert await redis_client.scard(keys.worker_blocks("w0")) == 0
