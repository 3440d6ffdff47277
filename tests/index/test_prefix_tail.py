"""The in-memory tail of the prefix index agrees with Redis through events, gaps and restarts."""

from __future__ import annotations

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
