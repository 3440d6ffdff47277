"""Redis down, frozen or restarted empty: failures are prompt `IndexUnavailable`s, never hangs,
and writers re-publish their state once Redis is back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from cli.redis_server import LocalRedisServer
from cluster.errors import IndexUnavailable
from cluster.roles import Role
from engine.block_hash import hash_prompt_blocks
from index.prefix_index import PrefixIndexReader, PrefixIndexWriter
from index.prefix_tail import PrefixIndexTail
from index.redis_client import RedisConfig, bounded
from index.registry import WorkerRecord, WorkerRegistry

HASHES = hash_prompt_blocks(list(range(64)), 4)  # 16 blocks
# Bounded means: the configured op timeout (1 s in conftest), plus scheduling slack on a busy
# 2-core machine, and far below anything that looks like a hang.
PROMPT_S = 2.5


async def _fails_promptly(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.monotonic()
    with pytest.raises(IndexUnavailable):
        await call()
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT_S, f"took {elapsed:.2f} s"
    return elapsed


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("outage", ["killed", "frozen"])
async def test_outage_raises_index_unavailable_promptly(
        redis_server: LocalRedisServer, redis_client: Redis, redis_config: RedisConfig,
        outage: str) -> None:
    writer = PrefixIndexWriter(redis_client, redis_config, "p0")
    await writer.start()
    writer.stored(HASHES)
    await writer.flush()
    reader = PrefixIndexReader(redis_client, redis_config)
    tail = PrefixIndexTail(redis_client, redis_config)
    registry = WorkerRegistry(redis_client, redis_config)
    record = WorkerRecord("p0", Role.PREFILL, "127.0.0.1:1")
    await registry.heartbeat(record)
    assert await reader.lookup(HASHES) == {"p0": 16}
    await tail.sync(["p0"])

    if outage == "killed":
        redis_server.kill()
    else:
        redis_server.pause()  # open connections that never answer: the case that hangs
    try:
        await _fails_promptly(lambda: reader.lookup(HASHES))
        writer.evicted(HASHES[8:])
        await _fails_promptly(writer.flush)
        await _fails_promptly(lambda: registry.heartbeat(record))
        await _fails_promptly(registry.list_workers)
        await _fails_promptly(lambda: tail.sync(["p0"]))
    finally:
        redis_server.resume()
    # each fallback is counted where the metrics read it
    assert (writer.publish_failures, registry.list_failures, tail.sync_failures) == (1, 1, 1)
    assert (writer.republishes, tail.reloads) == (1, 1)


async def test_restarted_redis_gets_state_back_from_flush(
        redis_server: LocalRedisServer, redis_client: Redis, redis_config: RedisConfig) -> None:
    writer = PrefixIndexWriter(redis_client, redis_config, "d0")
    await writer.start()
    writer.stored(HASHES[:10])
    await writer.flush()
    reader = PrefixIndexReader(redis_client, redis_config)

    redis_server.restart()  # empty: no persistence
    assert await reader.lookup(HASHES) == {}  # the index is gone ...
    writer.stored(HASHES[10:12])
    await writer.flush()  # ... the next batch sees the epoch missing and re-publishes all
    assert await reader.lookup(HASHES) == {"d0": 12}
    assert writer.republishes == 2


async def test_failed_publish_is_repaired_after_the_outage(
        redis_server: LocalRedisServer, redis_client: Redis, redis_config: RedisConfig) -> None:
    writer = PrefixIndexWriter(redis_client, redis_config, "d0")
    await writer.start()
    writer.stored(HASHES[:4])
    await writer.flush()
    redis_server.kill()
    writer.stored(HASHES[4:8])
    with pytest.raises(IndexUnavailable):
        await writer.flush()
    writer.stored(HASHES[8:10])  # while Redis is down: kept in memory only
    assert writer.pending == 0
    assert (writer.publish_failures, writer.republishes) == (1, 1)
    redis_server.start()
    await writer.flush()
    assert await PrefixIndexReader(redis_client, redis_config).lookup(HASHES) == {"d0": 10}
    assert (writer.publish_failures, writer.republishes) == (1, 2)  # repaired by a re-publish


async def test_run_loop_republishes_idle_state_after_restart(
        redis_server: LocalRedisServer, redis_client: Redis, redis_config: RedisConfig) -> None:
    writers = [PrefixIndexWriter(redis_client, redis_config, f"w{i}") for i in range(2)]
    for i, writer in enumerate(writers):
        await writer.start()
        writer.stored(HASHES[:4 + 4 * i])
    tasks = [asyncio.create_task(w.run(flush_interval_s=0.01, epoch_check_interval_s=0.1))
             for w in writers]
    reader = PrefixIndexReader(redis_client, redis_config)
    expected = {"w0": 4, "w1": 8}
    try:
        await _eventually(lambda: _lookup_is(reader, expected))
        redis_server.restart()
        # No new events: only the periodic epoch check can notice that Redis lost everything.
        await _eventually(lambda: _lookup_is(reader, expected))
        assert all(w.republishes >= 2 for w in writers)
        epochs = {await reader.epoch()}
        assert None not in epochs
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _lookup_is(reader: PrefixIndexReader, expected: dict[str, int]) -> bool:
    try:
        return await reader.lookup(HASHES) == expected
    except IndexUnavailable:
        return False


async def test_a_cancel_the_client_turns_into_an_error_still_cancels() -> None:
    """redis-py may answer a cancel in the middle of a reply with a connection error; `bounded`
    must not make that an IndexUnavailable, or a loop retrying on it never stops."""
    entered = asyncio.Event()

    async def operation() -> None:
        async with bounded("read", timeout_s=30):
            entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise ConnectionError("Connection closed by server.") from None

    task = asyncio.create_task(operation())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancel_the_client_swallows_and_retries_still_cancels() -> None:
    """redis-py's retry may answer a cancel by running the command again on a fresh
    connection, so the call returns normally: the task must still end cancelled (seen as a
    router whose close() hung on its prefix-tail loop)."""
    entered = asyncio.Event()
    finished = False

    async def operation() -> None:
        nonlocal finished
        async with bounded("read", timeout_s=30):
            entered.set()
            with contextlib.suppress(asyncio.CancelledError):  # the retry's fresh connection
                await asyncio.sleep(30)
        finished = True

    task = asyncio.create_task(operation())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not finished


async def test_a_task_already_cancelling_may_still_use_redis() -> None:
    """Clean-up inside a cancelled task (a worker deregistering on its way out) is not
    mistaken for a new cancel."""
    done = asyncio.Event()

    async def cleanup() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            async with bounded("deregister", timeout_s=30):
                await asyncio.sleep(0)
            done.set()
            raise

    task = asyncio.create_task(cleanup())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set()


async def test_an_error_without_a_cancel_is_still_index_unavailable() -> None:
    with pytest.raises(IndexUnavailable, match="redis read failed: ConnectionError"):
        async with bounded("read", timeout_s=30):
            raise ConnectionError("Connection closed by server.")
