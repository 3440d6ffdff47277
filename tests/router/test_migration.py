"""Request migration against scripted workers over real gRPC (tests/router/fakes.py): a lost
decode stream — failed, or stalled past `decode_stall_s` — continues on another pair with the
tokens so far, the same client stream, a fresh attempt id and the sampling's offset; past
`max_migrations` the request ends naming the workers. And the deadlines before the first
token: a hung prefill (`prefill_timeout_s`), a local route's silent first token. The fakes
"generate" `next_token` of the context, so an undisturbed run is known exactly. Real workers:
tests/e2e/test_migration.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from cli.redis_server import LocalRedisServer
from cluster.errors import NoWorker
from cluster.roles import Role
from cluster.tls import PLAINTEXT
from engine.sampling import SamplingParams
from index.redis_client import RedisConfig, connect
from index.registry import WorkerRegistry
from router.config import RouterConfig
from router.request import Delta, GenerateInput
from router.router import Router
from tests.router.fakes import FakeDecode, FakePrefill, Script, next_token, router_over

pytestmark = pytest.mark.timeout(60)

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def redis() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as server:
        yield server


@asynccontextmanager
async def cluster(redis: LocalRedisServer, model: Path, decode: int, prefill: int = 1,
                  **overrides: Any,
                  ) -> AsyncIterator[tuple[Router, list[FakePrefill], list[FakeDecode]]]:
    """`prefill` counting prefill workers, `decode` counting decode workers sharing one plan
    of scripts (the first Decode calls, wherever they land), and a router (`overrides`)."""
    namespace = f"m{id(overrides)}"
    config = RouterConfig(model=str(model), redis_url=redis.url, namespace=namespace,
                          tls=PLAINTEXT,
                          refresh_interval_s=0.05, prefix_index="pipelined", **overrides)
    client = connect(RedisConfig(url=redis.url, namespace=namespace))
    registry = WorkerRegistry(client, RedisConfig(url=redis.url, namespace=namespace), ttl_s=60)
    prefills = [FakePrefill(f"p{i}", Role.PREFILL, counting=True) for i in range(prefill)]
    plan: list[Script] = []
    decoders = [FakeDecode(f"d{i}", Role.DECODE, script=Script(tokens=None, token_id=None),
                           plan=plan) for i in range(decode)]
    fakes: list[FakePrefill | FakeDecode] = [*prefills, *decoders]
    try:
        async with router_over(config, fakes, registry) as router:
            yield router, prefills, decoders
    finally:
        await client.aclose()


def request(request_id: str, sampling: SamplingParams, stop: list[str] | None = None,
            ) -> GenerateInput:
    return GenerateInput(request_id=request_id, text="", token_ids=list(PROMPT),
                         sampling=sampling, stop=stop or [])


async def collect(router: Router, generate: GenerateInput) -> list[Delta]:
    return [delta async for delta in router.generate(generate)]


def undisturbed(max_tokens: int) -> list[int]:
    return [next_token(len(PROMPT) + i) for i in range(max_tokens)]


@pytest.mark.parametrize(("lost", "reason", "down"), [
    (Script(tokens=2, token_id=None, fail_with=grpc.StatusCode.UNAVAILABLE), "unreachable", True),
    (Script(tokens=2, token_id=None, fail_with=grpc.StatusCode.INTERNAL), "error", False),
    (Script(tokens=2, token_id=None, hold=True), "stalled", True),
])
async def test_a_lost_decode_stream_continues_on_another_pair_token_for_token(
        redis: LocalRedisServer, tiny_llama: Path, lost: Script, reason: str,
        down: bool) -> None:
    async with cluster(redis, tiny_llama, 2,
                       decode_stall_s=0.5) as (router, (prefill,), decoders):
        decoders[0].plan.append(lost)  # the first Decode call, on whichever worker
        sampling = SamplingParams(max_tokens=8, temperature=0.7, seed=42)
        deltas = await collect(router, request("r", sampling))
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == undisturbed(8)  # nothing repeated, nothing lost
        assert deltas[-1].finish_reason == "length"
        usage = deltas[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 8)
        # the second prefill: prompt + the 3 tokens so far, a fresh id, the sampling resumed
        first, second = prefill.requests
        assert (first.request_id, second.request_id) == ("r.0", "r.1")
        assert list(second.token_ids) == PROMPT + undisturbed(3)
        assert (second.sampling.max_tokens, second.sampling.seed_offset) == (5, 3)
        assert second.sampling.seed == 42
        gone = next(d for d in decoders if "r.0" in d.reserves)
        other = next(d for d in decoders if d is not gone)
        assert second.target.endpoint.worker_id == other.worker_id  # never the lost worker
        assert router.stats.migrations == {reason: 1}
        assert router.registry.get_sample_value("tandem_router_migrations_total",
                                                {"reason": reason}) == 1
        assert (gone.worker_id in {h.worker_id for h in router.pool.live(Role.DECODE)}) != down

        async def cancelled() -> None:  # the lost attempt, released in the background
            while "r.0" not in gone.cancelled or gone.holding():
                await asyncio.sleep(0.02)
        await asyncio.wait_for(cancelled(), 5)
        assert router.admission.inflight == 0


async def test_past_max_migrations_the_request_ends_unavailable_naming_the_workers(
        redis: LocalRedisServer, tiny_llama: Path) -> None:
    async with cluster(redis, tiny_llama, 3, max_migrations=1) as (router, _, decoders):
        failing = Script(tokens=1, token_id=None, fail_with=grpc.StatusCode.UNAVAILABLE)
        decoders[0].plan.extend([failing, failing])
        with pytest.raises(NoWorker, match="max_migrations=1") as caught:
            await collect(router, request("r", SamplingParams(max_tokens=8)))
        lost = [d.worker_id for d in decoders if d.calls["decode"]]
        assert len(lost) == 2
        for worker_id in lost:
            assert f"decode worker {worker_id} failed mid-request: UNAVAILABLE" in str(
                caught.value)
        assert router.stats.migrations == {"unreachable": 1}
        assert router.stats.outcomes["UNAVAILABLE"] == 1


async def test_without_another_decode_worker_the_migration_fails_naming_the_lost_one(
        redis: LocalRedisServer, tiny_llama: Path) -> None:
    async with cluster(redis, tiny_llama, 1) as (router, _, decoders):
        decoders[0].plan.append(Script(tokens=1, token_id=None,
                                       fail_with=grpc.StatusCode.NOT_FOUND))
        with pytest.raises(NoWorker, match="d0 failed mid-request: NOT_FOUND.*migrating it "
                                           "failed: no live decode worker"):
            await collect(router, request("r", SamplingParams(max_tokens=8)))


async def test_a_request_whose_every_token_came_loses_only_its_finish_reason(
        redis: LocalRedisServer, tiny_llama: Path) -> None:
    """The stream broke after the last token: the request is whole, nothing to migrate."""
    async with cluster(redis, tiny_llama, 2) as (router, (prefill,), decoders):
        decoders[0].plan.append(Script(tokens=3, token_id=None,
                                       fail_with=grpc.StatusCode.UNAVAILABLE))
        deltas = await collect(router, request("r", SamplingParams(max_tokens=4)))
        assert [t for d in deltas for t in d.token_ids] == undisturbed(4)
        assert deltas[-1].finish_reason == "length"
        assert len(prefill.requests) == 1 and not router.stats.migrations


async def test_a_stop_string_across_the_migration_is_found_and_usage_counts_every_token(
        redis: LocalRedisServer, tiny_llama: Path) -> None:
    """The stop checker lives in the router across attempts: a stop string whose first half
    came from the lost worker and whose second half from the new pair still stops."""
    async with cluster(redis, tiny_llama, 2) as (router, (prefill,), decoders):
        decoders[0].plan.append(Script(tokens=2, token_id=None,
                                       fail_with=grpc.StatusCode.UNAVAILABLE))
        tokens = undisturbed(8)
        text = router.tokenizer.decode(tokens)
        # the 3rd token (the lost worker's last) ends with "\n", the 4th (the new pair's first)
        assert router.tokenizer.decode(tokens[:3]).endswith("\n")
        stop = "\n" + router.tokenizer.decode(tokens[3:5])
        deltas = await collect(router, request("r", SamplingParams(max_tokens=8), [stop]))
        assert [t for d in deltas for t in d.token_ids] == tokens[:5]
        assert "".join(d.text for d in deltas) == text[:text.index(stop)]
        last = deltas[-1]
        assert (last.finish_reason, last.stop_string) == ("stop", stop)
        assert last.usage is not None and last.usage.completion_tokens == 5
        assert len(prefill.requests) == 2 and router.stats.migrations == {"unreachable": 1}


# ---- deadlines before the first token ----------------------------------------------------


async def test_a_prefill_past_its_deadline_goes_to_another_pair(
        redis: LocalRedisServer, tiny_llama: Path) -> None:
    async with cluster(redis, tiny_llama, 1, prefill=2,
                       prefill_timeout_s=0.5) as (router, prefills, decoders):
        prefills[0].delay_s = prefills[1].delay_s = 60.0  # hung, until one is chosen
        task = asyncio.create_task(collect(router, request("r", SamplingParams(max_tokens=4))))
        while not any(p.requests for p in prefills):
            await asyncio.sleep(0.01)
        hung = next(p for p in prefills if p.requests)
        next(p for p in prefills if p is not hung).delay_s = 0.0
        deltas = await asyncio.wait_for(task, 10)
        assert [t for d in deltas for t in d.token_ids] == undisturbed(4)
        assert router.stats.retries == 1
        handle = router.pool.workers[hung.worker_id]
        assert not handle.up and "DEADLINE_EXCEEDED" in handle.last_error
        assert "r.0" in decoders[0].cancelled  # its reservation, released at once


async def test_a_local_route_without_a_first_token_by_the_deadline_goes_elsewhere(
        redis: LocalRedisServer, tiny_llama: Path) -> None:
    """Conditional disaggregation: the decode worker prefills; one that never sends the
    first token is given up after prefill_timeout_s, like a hung prefill worker."""
    async with cluster(redis, tiny_llama, 2, prefill_timeout_s=0.5,
                       local_prefill_max_tokens=64) as (router, _, decoders):
        decoders[0].plan.append(Script(tokens=0, hold=True))  # the first call: silent
        deltas = await asyncio.wait_for(
            collect(router, request("r", SamplingParams(max_tokens=4))), 10)
        assert deltas[-1].finish_reason == "length"
        hung = next(d for d in decoders if "r.0" in d.reserves)
        assert router.stats.retries == 1 and router.stats.local_prefills["short_prompt"] == 1
        handle = router.pool.workers[hung.worker_id]
        assert not handle.up and "DEADLINE_EXCEEDED" in handle.last_error

        async def released() -> None:
            while hung.holding():
                await asyncio.sleep(0.02)
        await asyncio.wait_for(released(), 5)
