"""The Redis worker registry: heartbeats, expiry, listing, deregistration."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from cli.redis_server import LocalRedisServer
from cluster.roles import Role
from index.redis_client import RedisConfig
from index.registry import Heartbeat, LoadReport, WorkerRecord, WorkerRegistry

METADATA = bytes(range(256))  # opaque, not UTF-8


def _record(worker_id: str, role: Role = Role.DECODE, running: int = 0) -> WorkerRecord:
    return WorkerRecord(worker_id, role, f"127.0.0.1:{5000 + len(worker_id)}",
                        transfer_metadata=METADATA,
                        load=LoadReport(running=running, kv_blocks_total=1024, max_running=64),
                        started_unix_ms=1)


async def test_register_and_list(redis_client: Redis, redis_config: RedisConfig) -> None:
    registry = WorkerRegistry(redis_client, redis_config)
    await registry.heartbeat(_record("d0", running=3))
    await registry.heartbeat(_record("p0", Role.PREFILL))
    workers = await registry.list_workers()
    assert [w.worker_id for w in workers] == ["d0", "p0"]
    d0 = workers[0]
    assert d0.role is Role.DECODE and d0.transfer_metadata == METADATA
    assert d0.load == LoadReport(running=3, kv_blocks_total=1024, max_running=64)
    assert d0.updated_unix_ms > 0
    assert [w.worker_id for w in await registry.list_workers(Role.PREFILL)] == ["p0"]
    await registry.heartbeat(_record("d0", running=5))
    assert (await registry.list_workers(Role.DECODE))[0].load.running == 5


async def test_heartbeat_expiry_removes_worker(redis_client: Redis,
                                               redis_config: RedisConfig) -> None:
    registry = WorkerRegistry(redis_client, redis_config, ttl_s=0.3)
    await registry.heartbeat(_record("d0"))
    assert len(await registry.list_workers()) == 1
    await asyncio.sleep(0.45)
    assert await registry.list_workers() == []
    assert await redis_client.smembers(f"{redis_config.namespace}:workers") == set()


async def test_heartbeat_loop_keeps_worker_alive_then_deregisters(
        redis_client: Redis, redis_config: RedisConfig) -> None:
    registry = WorkerRegistry(redis_client, redis_config, ttl_s=0.3)
    heartbeat = Heartbeat(registry, lambda: _record("p0", Role.PREFILL))
    await heartbeat.start()
    await asyncio.sleep(0.7)  # more than twice the TTL
    assert [w.worker_id for w in await registry.list_workers()] == ["p0"]
    await heartbeat.stop()
    assert await registry.list_workers() == []


async def test_heartbeat_survives_outage_and_reregisters(
        redis_server: LocalRedisServer, redis_client: Redis, redis_config: RedisConfig) -> None:
    registry = WorkerRegistry(redis_client, redis_config, ttl_s=0.6)
    heartbeat = Heartbeat(registry, lambda: _record("d0"))
    await heartbeat.start()
    try:
        redis_server.kill()
        await asyncio.sleep(0.5)  # the loop fails and keeps going
        assert heartbeat.failures >= 1
        redis_server.start()  # empty
        await asyncio.sleep(0.5)
        assert [w.worker_id for w in await registry.list_workers()] == ["d0"]
    finally:
        await heartbeat.stop()
