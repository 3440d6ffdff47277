"""The router's in-memory prefix index against what the workers report: a route on blocks a
worker no longer holds is counted (`tandem_router_stale_index_routes_total`, GetClusterStatus),
and a worker whose registry heartbeat lapses leaves the index at once. Scripted workers over
real gRPC (tests/router/fakes.py), a real redis-server, the router as `router.__main__` builds
it (tail index, kv_aware)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from cli.redis_server import LocalRedisServer
from cluster.roles import Role
from cluster.tls import PLAINTEXT
from engine.block_hash import DEFAULT_HASH_SEED, hash_prompt_blocks
from engine.sampling import SamplingParams
from index.prefix_index import PrefixIndexWriter
from index.redis_client import RedisConfig, connect
from index.registry import WorkerRecord, WorkerRegistry
from router.__main__ import build_router
from router.config import RouterConfig
from router.prefix import TailSource
from router.request import GenerateInput
from router.service import RouterServicer
from router.stale_index import is_stale
from tandem_proto.tandem.v1 import router_pb2
from tests.router.fakes import FakeDecode, FakePrefill, serve

pytestmark = pytest.mark.timeout(60)

PROMPT = list(range(5, 5 + 16 * 4 + 3))  # 4 full blocks of 16 and 3 tokens
HASHES = hash_prompt_blocks(PROMPT, 16, b"", DEFAULT_HASH_SEED)


@pytest.fixture(scope="module")
def redis() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as server:
        yield server


async def until(condition: Callable[[], bool], state: Callable[[], str],
                timeout_s: float = 20.0) -> None:
    """Waits for `condition`, failing with `state()` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not converged in {timeout_s} s: {state()}"
        await asyncio.sleep(0.02)


def test_the_prediction_is_capped_as_the_workers_cap_reuse() -> None:
    assert is_stale(predicted=4, reported=3, prompt_tokens=67, block_size=16)
    assert not is_stale(predicted=4, reported=4, prompt_tokens=67, block_size=16)
    assert not is_stale(predicted=4, reported=6, prompt_tokens=67, block_size=16)
    # 64 tokens: the last token is recomputed, so at most 3 blocks come from a cache
    assert not is_stale(predicted=4, reported=3, prompt_tokens=64, block_size=16)
    assert not is_stale(predicted=0, reported=0, prompt_tokens=67, block_size=16)


async def test_stale_routes_are_counted_and_a_lapsed_worker_leaves_the_index(
        redis: LocalRedisServer, tiny_llama: Path) -> None:
    redis_cfg = RedisConfig(url=redis.url, namespace="stale")
    client = connect(redis_cfg)
    registry = WorkerRegistry(client, redis_cfg, ttl_s=2.0)  # generous: a loaded box
    prefill, decode = FakePrefill("p0", Role.PREFILL), FakeDecode("d0", Role.DECODE)
    lapsing = FakeDecode("d1", Role.DECODE)
    for fake in (prefill, decode, lapsing):
        await serve(fake, registry)
    beating = {fake.worker_id: fake for fake in (prefill, decode, lapsing)}

    async def heartbeats() -> None:
        while True:
            for fake in list(beating.values()):
                await registry.heartbeat(WorkerRecord(fake.worker_id, fake.role, fake.address))
            await asyncio.sleep(0.1)
    beat = asyncio.create_task(heartbeats())
    config = RouterConfig(model=str(tiny_llama), redis_url=redis.url, namespace="stale",
                          tls=PLAINTEXT,
                          refresh_interval_s=0.05, prefix_index="tail", policy="kv_aware")
    router = await build_router(config)
    servicer = RouterServicer(router)
    try:
        # the index says p0 and d0 (and d1) hold the whole prompt; the fakes hold nothing
        writers = [PrefixIndexWriter(client, redis_cfg, w) for w in ("p0", "d0", "d1")]
        for writer in writers:
            await writer.start()
            writer.stored(HASHES)
            await writer.flush()
        source = router.lookup.reader
        assert isinstance(source, TailSource)
        await until(lambda: source.tail.lookup(HASHES) == {"p0": 4, "d0": 4, "d1": 4}
                    and len(router.pool.live(Role.DECODE)) >= 2,
                    lambda: f"index {source.tail.lookup(HASHES)}, listed "
                            f"{router.pool.listed()}, live decode "
                            f"{[h.worker_id for h in router.pool.live(Role.DECODE)]}, "
                            f"tail {source.error!r} {source.tail.resyncs}")
        sampling = SamplingParams(max_tokens=2)
        for i in range(2):
            async for _ in router.generate(GenerateInput(f"r{i}", "", PROMPT, sampling)):
                pass
        assert router.stats.stale_index_routes == {"decode": 2, "prefill": 2}
        status = await servicer.GetClusterStatus(router_pb2.GetClusterStatusRequest(), None)
        assert status.counters["stale_index_routes/decode"] == 2
        assert status.counters["stale_index_routes/prefill"] == 2
        assert status.counters["index_resyncs/new"] >= 3
        assert b'tandem_router_stale_index_routes_total{role="decode"} 2.0' in \
            generate_latest(router.registry)

        # a prompt the index knows nothing of is no stale route
        async for _ in router.generate(GenerateInput("fresh", "", [9] * 40, sampling)):
            pass
        assert router.stats.stale_index_routes == {"decode": 2, "prefill": 2}

        # d1 stops beating: once its registry key expires the index drops it, while the pool
        # still keeps its handle (the registry may only have restarted empty)
        del beating[lapsing.worker_id]
        await until(lambda: "d1" not in source.tail.workers,
                    lambda: f"tail workers {sorted(source.tail.workers)}, listed "
                            f"{router.pool.listed()}")
        assert source.tail.lookup(HASHES) == {"p0": 4, "d0": 4}
        assert source.tail.drops == 1 and "d1" in router.pool.workers
        status = await servicer.GetClusterStatus(router_pb2.GetClusterStatusRequest(), None)
        assert status.counters["index_drops"] == 1
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        await router.close()
        for fake in (prefill, decode, lapsing):
            assert fake.server is not None
            await fake.server.stop(None)
        await client.aclose()
