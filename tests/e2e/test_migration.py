"""Faults on the request path, on a real local cluster: a decode worker killed (kill -9) or
stopped (SIGSTOP) mid-generation migrates its request to another pair with exactly the tokens
of an undisturbed run, greedy and seeded; past `max_migrations` the request ends UNAVAILABLE
naming the workers; a stopped prefill worker's request goes to another pair after
`prefill_timeout_s`; a prefill worker killed mid-prefill has its decode reservation released
at once, not at lease expiry; a router killed mid-request leaves nothing held past the lease.
Each test ends with every live worker's blocks all free.

Workers run with an injected per-step delay (`--step-delay-ms`) so that requests are reliably
in flight when a process is killed or stopped; the router with short bounds (`--decode-stall-s`,
`--prefill-timeout-s`) and one migration per request.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from cli.local_cluster import LocalCluster, ServiceProcess
from cli.router_client import RouterClient
from tests.e2e.helpers import (
    all_counters,
    blocks_all_free,
    counters,
    expected,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

STALL_S = 3.0  # the router's decode_stall_s here: 30 steps of this cluster
PREFILL_TIMEOUT_S = 5.0  # a 400-token prompt takes 7 steps of >= 100 ms
LEASE_S = 6.0  # the router's reservation lease: longer than any prefill it waits for
QUARANTINE_S = 1.0


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[LocalCluster]:
    """2 prefill and 5 decode workers: the tests below, in this order, stop and wake some and
    kill four decode workers and one prefill worker (a spare each time, no restarts)."""
    logs = tmp_path_factory.mktemp("migration-logs")
    with LocalCluster(tiny_llama, prefill=2, decode=5, log_dir=logs,
                      worker_args=["--num-blocks", "192", "--step-delay-ms", "100",
                                   "--max-num-batched-tokens", "64",
                                   "--quarantine-s", str(QUARANTINE_S),
                                   "--shutdown-grace-s", "2"],
                      router_args=["--decode-stall-s", str(STALL_S),
                                   "--prefill-timeout-s", str(PREFILL_TIMEOUT_S),
                                   "--lease-ms", str(int(LEASE_S * 1000)),
                                   "--max-migrations", "1"]) as running:
        yield running


def prompt(seed: int, n: int = 24) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def serving(cluster: LocalCluster, role: str) -> ServiceProcess:
    """The one `role` worker prefilling or decoding a request (the test has one in flight;
    a decode worker counts only once the request runs there, not while it is reserved)."""
    found: list[ServiceProcess] = []
    gauge = "running" if role == "decode" else "requests"

    async def one() -> bool:
        stats = await all_counters(cluster)
        found[:] = [w for w in cluster.workers(role) if stats[w.name][gauge] > 0]
        return len(found) == 1
    await wait_until(one, timeout_s=20, what=f"a {role} worker holding the request")
    return found[0]


async def routable(cluster: LocalCluster) -> None:
    """Waits until the router routes to every live worker (a stopped one came back)."""
    everyone = {w.worker_id for role in ("prefill", "decode") for w in cluster.workers(role)}

    async def live() -> bool:
        async with RouterClient(cluster.router_address) as client:
            return everyone <= {w.worker_id for w in (await client.status()).workers}
    await wait_until(live, timeout_s=30, what="every worker routable")


async def clean(cluster: LocalCluster) -> None:
    await wait_until(lambda: blocks_all_free(cluster), timeout_s=30,
                     what="every live worker's blocks free")


async def test_a_stopped_decode_worker_stalls_its_stream_only_until_the_bound(
        cluster: LocalCluster, tiny_llama: Path) -> None:
    await routable(cluster)
    p = prompt(3)
    tokens: list[int] = []
    stopped: ServiceProcess | None = None
    arrivals: list[float] = []  # of the chunks after the SIGSTOP (some were sent before it)
    try:
        async with RouterClient(cluster.router_address) as client:
            async for chunk in client.generate(token_ids=p, max_tokens=24, ignore_eos=True,
                                               timeout=60):
                tokens += chunk.token_ids
                if stopped is None and len(tokens) >= 3:
                    stopped = await serving(cluster, "decode")
                    os.kill(stopped.popen.pid, signal.SIGSTOP)
                    arrivals.append(time.monotonic())
                elif stopped is not None:
                    arrivals.append(time.monotonic())
            status = await client.status()
        assert tokens == expected(tiny_llama, p, 24)
        stall = max(b - a for a, b in itertools.pairwise(arrivals))  # the one long gap
        assert STALL_S <= stall < STALL_S + 10, (stall, arrivals)
        assert status.counters["migrations/stalled"] >= 1
    finally:
        if stopped is not None:
            os.kill(stopped.popen.pid, signal.SIGCONT)
    await routable(cluster)
    await clean(cluster)  # the woken worker freed the request it was stopped with


async def test_a_stopped_prefill_worker_s_request_is_served_by_another_pair(
        cluster: LocalCluster, tiny_llama: Path) -> None:
    await routable(cluster)
    p = prompt(4, 400)
    stopped: ServiceProcess | None = None
    try:
        async with RouterClient(cluster.router_address) as client:
            task = asyncio.create_task(client.complete(token_ids=p, max_tokens=3,
                                                       ignore_eos=True, timeout=60))
            stopped = await serving(cluster, "prefill")
            os.kill(stopped.popen.pid, signal.SIGSTOP)
            result = await task
            status = await client.status()
        assert result.token_ids == expected(tiny_llama, p, 3)
        assert status.counters["retries"] >= 1
        assert stopped.worker_id not in {w.worker_id for w in status.workers}
    finally:
        if stopped is not None:
            os.kill(stopped.popen.pid, signal.SIGCONT)
    await routable(cluster)
    await clean(cluster)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 50, "seed": 1234}],
                         ids=["greedy", "seeded"])
async def test_a_decode_worker_killed_mid_generation_migrates_its_request_token_for_token(
        cluster: LocalCluster, tiny_llama: Path, sampling: dict[str, Any]) -> None:
    await routable(cluster)
    p = prompt(1)
    async with RouterClient(cluster.router_address) as client:
        undisturbed = await client.complete(token_ids=p, max_tokens=24, ignore_eos=True,
                                            timeout=60, **sampling)
        before = (await client.status()).counters["migrations/unreachable"]
        tokens: list[int] = []
        victim = None
        usage: tuple[int, int, str] | None = None
        async for chunk in client.generate(token_ids=p, max_tokens=24, ignore_eos=True,
                                           timeout=60, **sampling):
            tokens += chunk.token_ids
            if victim is None and len(tokens) >= 3:  # decoding: 21 steps of >= 100 ms to go
                victim = await serving(cluster, "decode")
                cluster.kill(victim)
            if chunk.finish_reason is not None:
                usage = (chunk.prompt_tokens, chunk.completion_tokens, chunk.finish_reason)
        status = await client.status()
    assert victim is not None and len(tokens) == 24
    assert tokens == undisturbed.token_ids
    if not sampling:
        assert tokens == expected(tiny_llama, p, 24)
    else:
        assert tokens != expected(tiny_llama, p, 24)  # it really sampled
    assert usage == (len(p), 24, "length")
    assert status.counters["migrations/unreachable"] == before + 1
    assert scrape(cluster.router)["tandem_router_migrations_total"] >= 1
    assert "migrating to another pair after" in cluster.router.log()
    await clean(cluster)


async def test_past_the_migration_limit_the_request_ends_unavailable_naming_the_workers(
        cluster: LocalCluster) -> None:
    await routable(cluster)
    victims: list[ServiceProcess] = []
    tokens: list[int] = []
    async with RouterClient(cluster.router_address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for chunk in client.generate(token_ids=prompt(2), max_tokens=30,
                                               ignore_eos=True, timeout=60):
                tokens += chunk.token_ids
                if len(tokens) >= 3 + 5 * len(victims) and len(victims) < 2:
                    victims.append(await serving(cluster, "decode"))
                    cluster.kill(victims[-1])
    assert len(victims) == 2 and len(tokens) < 30
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "max_migrations=1" in details
    for victim in victims:
        assert f"decode worker {victim.worker_id} failed mid-request" in details, details
    await clean(cluster)


async def test_a_prefill_worker_killed_mid_prefill_releases_the_reservation_at_once(
        cluster: LocalCluster, tiny_llama: Path) -> None:
    await routable(cluster)
    p = prompt(5, 400)
    expiries = {w.name: (await counters(w))["lease_expiries"] for w in cluster.workers("decode")}
    async with RouterClient(cluster.router_address) as client:
        task = asyncio.create_task(client.complete(token_ids=p, max_tokens=2, ignore_eos=True,
                                                   timeout=60))
        victim = await serving(cluster, "prefill")
        cluster.kill(victim)
        killed_at = time.monotonic()
        result = await task
    assert result.token_ids == expected(tiny_llama, p, 2)  # retried on the other pair
    await clean(cluster)
    released_in = time.monotonic() - killed_at
    assert released_in < LEASE_S + QUARANTINE_S, released_in
    for worker in cluster.workers("decode"):  # the router's cancel freed it, not the lease
        assert (await counters(worker))["lease_expiries"] == expiries[worker.name]


@pytest.mark.parametrize("phase", ["prefill", "decode"])
async def test_a_router_killed_mid_request_leaves_no_block_held_past_the_lease(
        cluster: LocalCluster, phase: str) -> None:
    """Whatever a router held when it died is free within its lease: a decode stream ends
    with the router's connection; a reservation whose Decode never came expires."""
    await routable(cluster)
    expiries = sum([(await counters(w))["lease_expiries"] for w in cluster.workers("decode")])
    async with RouterClient(cluster.router_address) as client:
        task = asyncio.create_task(client.complete(token_ids=prompt(6, 400), max_tokens=40,
                                                   ignore_eos=True, timeout=60))
        await serving(cluster, phase)
        cluster.kill(cluster.router)
        killed_at = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError):
            await task
    await wait_until(lambda: blocks_all_free(cluster), timeout_s=LEASE_S + QUARANTINE_S + 5,
                     what="every block free within the lease")
    freed_in = time.monotonic() - killed_at
    assert freed_in < LEASE_S + QUARANTINE_S + 3, freed_in
    expired = sum([(await counters(w))["lease_expiries"] for w in cluster.workers("decode")])
    assert expired == expiries + (1 if phase == "prefill" else 0)
    restarted = cluster.spawn("router")  # for the next test
    await asyncio.to_thread(cluster.wait_ready, restarted)
