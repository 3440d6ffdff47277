"""The router's contracts with its workers, against scripted workers over real gRPC and a real
redis-server (tests/router/fakes.py says why fakes): what it retries, avoids, marks down and
relays to the client, and what it refuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cli.redis_server import LocalRedisServer
from cluster.errors import AlreadyRunning, InvalidRequest, NoWorker
from cluster.roles import Role
from cluster.tls import PLAINTEXT
from engine.sampling import SamplingParams
from index.redis_client import RedisConfig, connect
from index.registry import WorkerRegistry
from router.__main__ import build_router
from router.config import RouterConfig
from router.prefix import TailSource
from router.request import Delta, GenerateInput
from router.router import Router
from tests.router.fakes import FIRST_TOKEN, FakeDecode, FakePrefill, Script, router_over

pytestmark = pytest.mark.timeout(60)


@dataclass
class Cluster:
    router: Router
    prefill: list[FakePrefill]
    decode: list[FakeDecode]


@pytest.fixture(scope="module")
def redis() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as server:
        yield server


Factory = Callable[[int, int], AbstractAsyncContextManager[Cluster]]


@pytest.fixture
def make_cluster(redis: LocalRedisServer, tiny_llama: Path) -> Iterator[Factory]:
    """`async with make_cluster(P, D) as cluster`: P fake prefill and D fake decode workers,
    registered, and a router that sees them all."""
    namespaces = iter(range(1000))

    @asynccontextmanager
    async def make(prefill: int, decode: int) -> AsyncIterator[Cluster]:
        namespace = f"t{next(namespaces)}"
        config = RouterConfig(model=str(tiny_llama), redis_url=redis.url, namespace=namespace,
                              tls=PLAINTEXT,
                              refresh_interval_s=0.05, prefix_index="pipelined")
        client = connect(RedisConfig(url=redis.url, namespace=namespace))
        registry = WorkerRegistry(client, RedisConfig(url=redis.url, namespace=namespace),
                                  ttl_s=60)
        fakes_p = [FakePrefill(f"p{i}", Role.PREFILL) for i in range(prefill)]
        fakes_d = [FakeDecode(f"d{i}", Role.DECODE) for i in range(decode)]
        fakes: list[FakePrefill | FakeDecode] = [*fakes_p, *fakes_d]
        try:
            async with router_over(config, fakes, registry) as router:
                yield Cluster(router, fakes_p, fakes_d)
        finally:
            await client.aclose()

    yield make


def request(request_id: str = "r1", max_tokens: int = 8, text: str = "",
            token_ids: tuple[int, ...] = (5, 6, 7)) -> GenerateInput:
    return GenerateInput(request_id=request_id, text=text,
                         token_ids=[] if text else list(token_ids),
                         sampling=SamplingParams(max_tokens=max_tokens))


async def collect(router: Router, generate: GenerateInput) -> list[Delta]:
    return [delta async for delta in router.generate(generate)]


async def test_a_pair_whose_transfers_keep_failing_is_listed_and_avoided(
        make_cluster: Factory) -> None:
    async with make_cluster(1, 2) as cluster:
        (prefill,) = cluster.prefill
        prefill.fail_to = {"d0"}
        for i in range(8):
            deltas = await collect(cluster.router, request(f"r{i}"))
            assert deltas[0].token_ids == [FIRST_TOKEN] and deltas[-1].finish_reason == "length"
        broken = cluster.router.excluded_pairs()
        assert set(broken) == {("p0", "d0")}
        assert "KV transfer failing" in broken[("p0", "d0")]
        assert "peer_lost" in broken[("p0", "d0")]
        attempts_on_d0 = prefill.calls["d0"]
        assert attempts_on_d0 == cluster.router.pair_health.threshold  # then never again
        assert {h.worker_id for h in cluster.router.pool.live(Role.DECODE)} == {"d0", "d1"}
        # the transfer works again: once the backoff runs out the pair is tried and heals
        prefill.fail_to = set()
        cluster.router.pair_health.backoff_s = 0.0
        for state in cluster.router.pair_health._pairs.values():
            state.broken_until = 0.0
        for i in range(4):
            await collect(cluster.router, request(f"again{i}"))
        assert cluster.router.excluded_pairs() == {}
        assert prefill.calls["d0"] > attempts_on_d0


@pytest.mark.parametrize(("code", "down"), [(grpc.StatusCode.NOT_FOUND, False),
                                            (grpc.StatusCode.INTERNAL, False),
                                            (grpc.StatusCode.UNAVAILABLE, True)])
async def test_a_decode_error_mid_stream_marks_the_worker_down_only_when_unreachable(
        make_cluster: Factory,
        code: grpc.StatusCode, down: bool) -> None:
    async with make_cluster(1, 1) as cluster:
        cluster.decode[0].script = Script(tokens=2, fail_with=code)
        with pytest.raises(NoWorker, match=f"d0 failed mid-request: {code.name}"):
            await collect(cluster.router, request())
        live = {h.worker_id for h in cluster.router.pool.live(Role.DECODE)}
        assert live == (set() if down else {"d0"})


async def test_a_worker_slow_to_answer_status_is_marked_down_only_after_several_misses(
        make_cluster: Factory) -> None:
    """A status poll that times out says the worker is slow (a long prefill can starve its
    event loop), not gone: it stays routable until `status_misses_before_down` polls in a row
    time out. A refused poll (UNAVAILABLE) still marks it down at once (tests/e2e)."""
    async with make_cluster(1, 1) as cluster:
        (decode,) = cluster.decode
        handle = cluster.router.pool.workers["d0"]
        decode.status_delay_s = 60.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while handle.status_misses < 1:
            assert loop.time() < deadline, "the status poll never timed out"
            await asyncio.sleep(0.02)
        assert handle.up
        deltas = await collect(cluster.router, request("while-slow"))
        assert deltas[-1].finish_reason == "length"  # still served
        misses = cluster.router.config.status_misses_before_down
        while handle.status_misses < misses:
            assert loop.time() < deadline, "the status polls stopped timing out"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.01)
        assert not handle.up
        assert f"DEADLINE_EXCEEDED ({misses} in a row)" in handle.last_error


async def test_a_request_released_by_its_decode_worker_ends_cancelled(
        make_cluster: Factory) -> None:
    async with make_cluster(1, 1) as cluster:
        (decode,) = cluster.decode
        decode.script = Script(tokens=2, hold=True)
        stream = asyncio.create_task(collect(cluster.router, request("held")))
        while not decode.holding():
            await asyncio.sleep(0.01)
        decode.on_cancel("held.0")  # what a Worker.Cancel or a lease does on a real worker
        deltas = await asyncio.wait_for(stream, 5)
        assert deltas[-1].finish_reason == "cancelled"
        assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
        assert cluster.router.admission.inflight == 0
        assert cluster.router.stats.outcomes["cancelled"] == 1


async def test_a_duplicate_running_id_is_refused_and_harms_no_one(
        make_cluster: Factory) -> None:
    async with make_cluster(1, 1) as cluster:
        (decode,) = cluster.decode
        decode.script = Script(tokens=1, hold=True)
        first = asyncio.create_task(collect(cluster.router, request("same")))
        while not decode.holding():
            await asyncio.sleep(0.01)
        with pytest.raises(AlreadyRunning, match="request_id: 'same' is already running"):
            await collect(cluster.router, request("same"))
        decode.on_cancel("same.0")
        assert (await asyncio.wait_for(first, 5))[-1].finish_reason == "cancelled"
        assert decode.calls["reserve"] == 1  # the duplicate never reached a worker
        assert len(cluster.router.pool.live(Role.DECODE)) == 1
        decode.script = Script()  # once the first ended, its id is free again
        assert (await collect(cluster.router, request("same")))[-1].finish_reason == "length"


async def test_a_stop_string_cancels_the_decode_stream_and_names_the_stop(
        make_cluster: Factory) -> None:
    async with make_cluster(1, 1) as cluster:
        (decode,) = cluster.decode
        letter = cluster.router.tokenizer.encode("q", add_special_tokens=False)[-1]
        decode.script = Script(tokens=1, token_id=letter, hold=True)
        stop = cluster.router.tokenizer.decode([letter])
        assert stop and stop not in cluster.router.tokenizer.decode([FIRST_TOKEN])
        generate = GenerateInput("stopped", "", [5, 6, 7], SamplingParams(max_tokens=8),
                                 stop=[stop])
        deltas = await asyncio.wait_for(collect(cluster.router, generate), 5)
        assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_string == stop
        while "stopped.0" not in decode.cancelled:  # the router frees it on the worker
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(("request_id", "message"), [
    ("bad\nid", "request_id: must be 1 to 128 characters"),
    ("x" * 129, "request_id: must be 1 to 128 characters"),
    ("", "request_id: must be 1 to 128 characters"),
])
async def test_request_ids_outside_the_safe_alphabet_are_refused(
        make_cluster: Factory, request_id: str,
        message: str) -> None:
    async with make_cluster(1, 1) as cluster:
        with pytest.raises(InvalidRequest, match=message):
            await collect(cluster.router, request(request_id))
        assert cluster.decode[0].calls["reserve"] == 0


async def test_closing_the_router_stops_its_index_tail(redis: LocalRedisServer,
                                                      tiny_llama: Path) -> None:
    router = await build_router(RouterConfig(model=str(tiny_llama), redis_url=redis.url,
                                             namespace="tail-stop", prefix_index="tail",
                                             tls=PLAINTEXT))
    source = router.lookup.reader
    assert isinstance(source, TailSource) and source._task is not None
    task = source._task
    await router.close()
    assert task.done() and source._task is None
