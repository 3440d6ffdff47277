"""The in-memory tail of the prefix index agrees with Redis through events, gaps and restarts."""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis

from cli.redis_server import LocalRedisServer
from engine.block_hash import hash_prompt_blocks
from index.prefix_index import PrefixIndexReader, PrefixIndexWriter
from index.prefix_keys import PrefixKeys
from index.prefix_tail import PrefixIndexTail
from index.redis_client import RedisConfig

HASHES = hash_prompt_blocks(list(range(128)), 4)  # 32 blocks


async def test_tail_follows_events_in_order(redis_client: Redis,
                                            redis_config: RedisConfig) -> None:
    writers = {w: PrefixIndexWriter(redis_client, redis_config, w) for w in ("p0", "d0")}
    for writer in writers.values():
        await writer.start()
    tail = PrefixIndexTail(redis_client, redis_config)
    await tail.sync(writers)
    assert tail.lookup(HASHES) == {}

    writers["p0"].stored(HASHES[:20])
    writers["d0"].stored(HASHES[:8])
    writers["p0"].evicted([HASHES[12]])
    for writer in writers.values():
        await writer.flush()
    reloads = tail.reloads
    await tail.sync(writers)
    assert tail.reloads == reloads  # plain tailing, no reload
    expected = {"p0": 12, "d0": 8}
    assert tail.lookup(HASHES) == expected
    assert await PrefixIndexReader(redis_client, redis_config).lookup(HASHES) == expected
    assert tail.lookup(HASHES, workers={"d0"}) == {"d0": 8}

    await tail.sync({"d0"})  # p0 left the registry
    assert tail.lookup(HASHES) == {"d0": 8}


async def test_tail_reloads_after_a_gap(redis_client: Redis, redis_config: RedisConfig) -> None:
    writer = PrefixIndexWriter(redis_client, redis_config, "p0", max_batch=1)
    await writer.start()
    tail = PrefixIndexTail(redis_client, redis_config)
    await tail.sync(["p0"])
    for block_hash in HASHES:  # 32 one-event batches ...
        writer.stored([block_hash])
        await writer.flush()
    # ... and the capped stream dropped all but the last while the tail was not looking.
    await redis_client.xtrim(PrefixKeys(redis_config.namespace).events("p0"), maxlen=1,
                             approximate=False)
    reloads = tail.reloads
    await tail.sync(["p0"])
    assert tail.reloads == reloads + 1
    assert tail.lookup(HASHES) == {"p0": 32}


async def test_tail_reloads_after_redis_restart(redis_server: LocalRedisServer,
                                                redis_client: Redis,
                                                redis_config: RedisConfig) -> None:
    writer = PrefixIndexWriter(redis_client, redis_config, "d0")
    await writer.start()
    writer.stored(HASHES[:10])
    await writer.flush()
    tail = PrefixIndexTail(redis_client, redis_config)
    await tail.sync(["d0"])
    assert tail.lookup(HASHES) == {"d0": 10}

    redis_server.restart()
    await tail.sync(["d0"])  # a new (missing) epoch: everything reloaded, nothing there yet
    assert tail.lookup(HASHES) == {}
    assert await writer.check_epoch()
    await tail.sync(["d0"])
    assert tail.lookup(HASHES) == {"d0": 10}


async def test_lost_events_are_a_gap_and_the_resync_ends_right(redis_client: Redis,
                                                                redis_config: RedisConfig) -> None:
    writer = PrefixIndexWriter(redis_client, redis_config, "d0", max_batch=1)
    await writer.start()
    tail = PrefixIndexTail(redis_client, redis_config)
    await tail.sync(["d0"])
    for block_hash in HASHES[:8]:
        writer.stored([block_hash])
        await writer.flush()
    await tail.sync(["d0"])
    assert tail.lookup(HASHES) == {"d0": 8} and tail.resyncs["gap"] == 0
    for block_hash in HASHES[8:20]:
        writer.stored([block_hash])
        await writer.flush()
    writer.evicted([HASHES[15]])
    await writer.flush()
    # three batches in the middle never reach this reader
    stream = PrefixKeys(redis_config.namespace).events("d0")
    entries: list[tuple[bytes, dict[bytes, bytes]]] = cast(Any, await redis_client.xrange(stream))
    await redis_client.xdel(stream, *[entry_id for entry_id, _ in entries[-8:-5]])
    await tail.sync(["d0"])
    assert tail.resyncs["gap"] == 1
    assert tail.lookup(HASHES) == {"d0": 15}
    assert tail.blocks("d0") == writer.held
    # and it tails on from there
    writer.stored(HASHES[15:16])
    await writer.flush()
    await tail.sync(["d0"])
    assert tail.lookup(HASHES) == {"d0": 20} and tail.resyncs["gap"] == 1


async def test_a_restarted_worker_replaces_its_old_entries(redis_client: Redis,
                                                           redis_config: RedisConfig) -> None:
    old = PrefixIndexWriter(redis_client, redis_config, "d0")
    await old.start()
    old.stored(HASHES[:10])
    await old.flush()
    tail = PrefixIndexTail(redis_client, redis_config)
    await tail.sync(["d0"])
    assert tail.lookup(HASHES) == {"d0": 10}
    # kill -9: no remove(); a new process with the same worker id starts afresh
    new = PrefixIndexWriter(redis_client, redis_config, "d0")
    assert new.incarnation != old.incarnation
    await new.start()
    other = hash_prompt_blocks(list(range(1000, 1016)), 4)
    new.stored(other[:2])
    await new.flush()
    new.stored(other[2:])
    await new.flush()
    # all but the new process's last entry are trimmed away before this reader sees them, and
    # that entry's sequence number (3) follows the old process's last (2): only the
    # incarnation says the sequence started again
    await redis_client.xtrim(PrefixKeys(redis_config.namespace).events("d0"), maxlen=1,
                             approximate=False)
    await tail.sync(["d0"])
    assert tail.resyncs["restart"] == 1 and tail.resyncs["gap"] == 0
    assert tail.lookup(HASHES) == {}
    assert tail.lookup(other) == {"d0": 4}
    assert tail.blocks("d0") == new.held


async def test_a_worker_that_leaves_is_dropped_and_reloaded_when_back(
        redis_client: Redis, redis_config: RedisConfig) -> None:
    writers = {w: PrefixIndexWriter(redis_client, redis_config, w) for w in ("d0", "d1")}
    for writer in writers.values():
        await writer.start()
        writer.stored(HASHES[:6])
        await writer.flush()
    tail = PrefixIndexTail(redis_client, redis_config)
    await tail.sync(["d0", "d1"])
    assert tail.resyncs["new"] == 2 and tail.lookup(HASHES) == {"d0": 6, "d1": 6}
    await tail.sync(["d0"])  # d1's heartbeat lapsed
    assert tail.drops == 1 and tail.workers == {"d0"}
    assert tail.lookup(HASHES) == {"d0": 6}
    await tail.sync(["d0", "d1"])  # it beats again
    assert tail.resyncs["new"] == 3 and tail.lookup(HASHES) == {"d0": 6, "d1": 6}
