"""Failures end to end: Redis outage and restart, prefill workers stalled (SIGSTOP) past the
transfer peer timeout, a prefill worker killed, a decode worker killed (its requests migrate),
a prefill worker whose KV layout does not match, SIGTERM; and the prefill queue a slow worker
reports. Real processes, real signals. Each failure test ends with every live worker's blocks
all free.

Workers here run with an injected per-step delay (`--step-delay-ms`, a fault-injection flag)
so that requests are reliably in flight when a process is killed, and with one layer per KV
cache group (`--kv-layer-group 1`; the tiny model's default puts both layers in one group) so
that prefill streams several writes per chunk, as it does for real models.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from cli.local_cluster import LocalCluster
from cli.router_client import Completion, RouterClient
from tandem_proto.tandem.v1 import router_pb2
from tests.e2e.helpers import (
    all_counters,
    blocks_all_free,
    counters,
    expected,
    scrape,
    wait_until,
    worker_status,
)

pytestmark = pytest.mark.timeout(300)


SLOW_WORKER_ARGS = ["--num-blocks", "192", "--step-delay-ms", "150",
                    "--max-num-batched-tokens", "64", "--kv-layer-group", "1",
                    "--shutdown-grace-s", "2"]


@pytest.fixture(scope="module")
def slow_cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[LocalCluster]:
    """On NIXL, the default backend (tests/e2e/test_failures_ucxx.py: the same on ucxx)."""
    logs = tmp_path_factory.mktemp("slow-cluster-logs")
    with LocalCluster(tiny_llama, prefill=2, decode=2, log_dir=logs,
                      worker_args=SLOW_WORKER_ARGS) as running:
        yield running


def prompt(seed: int, n: int = 40) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def index_mode(client: RouterClient) -> int:
    return (await client.status()).prefix_index_mode


async def test_a_slow_prefill_worker_reports_its_queued_prompt_blocks(
        slow_cluster: LocalCluster) -> None:
    """What the kv_aware policy's queue term reads: the prompt blocks a prefill worker has
    accepted and not computed yet, in its own status and in the router's cluster status."""
    long_prompt = prompt(500, 1500)  # 94 blocks of 16; 64-token chunks (4 blocks) per step
    blocks = -(-len(long_prompt) // 16)
    prefill = {p.worker_id for p in slow_cluster.workers("prefill")}
    worker_seen: list[float] = []
    router_seen: list[float] = []
    async with RouterClient(slow_cluster.router_address) as client:
        task = asyncio.create_task(client.complete(token_ids=long_prompt, max_tokens=1,
                                                   timeout=120))

        async def watch() -> bool:  # >= 24 steps of >= 150 ms: seconds of prefill
            statuses = await asyncio.gather(*(worker_status(p) for p in
                                              slow_cluster.workers("prefill")))
            worker_seen.extend(s.load.queued_prompt_blocks for s in statuses
                               if s.load.queued_prompt_blocks)
            router_seen.extend(w.load.queued_prompt_blocks for w in (await client.status()).workers
                               if w.worker_id in prefill and w.load.queued_prompt_blocks)
            return task.done()
        await wait_until(watch, timeout_s=120, what="the long prefill to finish")
        await task

        async def drained() -> bool:
            workers = (await client.status()).workers
            own = await asyncio.gather(*(worker_status(p) for p in
                                         slow_cluster.workers("prefill") +
                                         slow_cluster.workers("decode")))
            return not any(w.load.queued_prompt_blocks for w in [*workers, *own])
        await wait_until(drained, timeout_s=10, what="queued_prompt_blocks back to 0")
    assert len(worker_seen) >= 3 and router_seen, (worker_seen, router_seen)
    # each reading is the prompt's blocks less whole 4-block chunks already computed
    for seen in worker_seen + router_seen:
        assert 0 < seen <= blocks and (blocks - seen) % 4 == 0, (seen, worker_seen)
    assert max(worker_seen) > blocks // 2  # seen early, not only at the tail end
    await wait_until(lambda: blocks_all_free(slow_cluster), what="blocks freed")


async def test_redis_outage_degrades_then_recovers(slow_cluster: LocalCluster,
                                                   tiny_llama: Path) -> None:
    async with RouterClient(slow_cluster.router_address) as client:
        assert await index_mode(client) == 1
        slow_cluster.redis.kill()
        await asyncio.sleep(1.5)  # the router's in-memory index tolerates 1 s of staleness
        results = await asyncio.gather(*(
            client.complete(token_ids=prompt(i), max_tokens=4, ignore_eos=True, timeout=60)
            for i in range(4)))
        for i, result in enumerate(results):
            assert result.token_ids == expected(tiny_llama, prompt(i), 4)
        status = await client.status()
        assert status.prefix_index_mode == 2 and status.prefix_index_detail
        assert status.counters["decisions/least_loaded/degraded"] >= 4
        # every fallback shows in the processes' metrics
        router = scrape(slow_cluster.router)
        assert router["tandem_router_prefix_tail_sync_failures_total"] > 0
        assert router["tandem_router_registry_list_failures_total"] > 0
        assert router["tandem_router_index_mode_transitions_total"] >= 1
        for worker in slow_cluster.workers("prefill") + slow_cluster.workers("decode"):
            metrics = scrape(worker)
            assert metrics["tandem_registry_heartbeat_failures_total"] > 0, worker.name
            assert metrics["tandem_prefix_index_publish_failures_total"] > 0, worker.name
        republished = {w.name: scrape(w)["tandem_prefix_index_republishes_total"]
                       for w in slow_cluster.workers("prefill") + slow_cluster.workers("decode")}
        slow_cluster.redis.start()  # empty: workers must re-publish their blocks

        async def exact_again() -> bool:
            await client.complete(token_ids=[5, 6, 7], max_tokens=1, timeout=60)
            return await index_mode(client) == 1
        await wait_until(exact_again, timeout_s=30, what="exact mode after Redis restart")
        # re-published state is real: a repeat of an earlier prompt hits the prefix cache
        await asyncio.sleep(1.5)
        again = await client.complete(token_ids=prompt(0, 40), max_tokens=2, ignore_eos=True)
        assert again.cached_tokens == 32
    for worker in slow_cluster.workers("prefill") + slow_cluster.workers("decode"):
        assert scrape(worker)["tandem_prefix_index_republishes_total"] > republished[worker.name]
    assert scrape(slow_cluster.router)["tandem_router_prefix_tail_reloads_total"] > 0
    await wait_until(lambda: blocks_all_free(slow_cluster), what="blocks freed after the outage")


async def test_cancel_during_prefill_frees_blocks_on_both_sides(
        slow_cluster: LocalCluster) -> None:
    async with RouterClient(slow_cluster.router_address) as client:
        task = asyncio.create_task(client.complete(token_ids=prompt(50, 300), max_tokens=5,
                                                   ignore_eos=True))

        async def prefilling() -> bool:
            stats = await all_counters(slow_cluster)
            return any(c["requests"] > 0 for n, c in stats.items() if n.startswith("prefill"))
        await wait_until(prefilling, timeout_s=10, what="the request to reach a prefill worker")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await wait_until(lambda: blocks_all_free(slow_cluster), what="blocks freed on P and D")


async def test_stalled_prefill_workers_reconnect_after_sigcont(slow_cluster: LocalCluster,
                                                                tiny_llama: Path) -> None:
    """Every prefill worker stopped past the transfer peer timeout (5 s): the decode workers
    drop their links, and so do they on waking up. The next requests must make new links
    (before: every request on a pair linked before the stall failed with "no live
    connection", for good)."""
    prefills = slow_cluster.workers("prefill")
    prompts = [prompt(600 + i) for i in range(4)]
    async with RouterClient(slow_cluster.router_address) as client:
        async def linked() -> bool:  # every prefill worker holds a link to a decode worker
            await asyncio.gather(*(client.complete(token_ids=prompt(700 + i), max_tokens=1,
                                                   timeout=60) for i in range(2)))
            return all(scrape(w)["tandem_kv_transfer_peers_connected_total"] >= 1
                       for w in prefills)
        await wait_until(linked, timeout_s=60, what="a link from every prefill worker")
        links = {w.name: scrape(w)["tandem_kv_transfer_peers_connected_total"] for w in prefills}
        for worker in prefills:
            os.kill(worker.popen.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(6.5)  # > the peer timeout, and a heartbeat tick
        finally:
            for worker in prefills:
                os.kill(worker.popen.pid, signal.SIGCONT)
        woke = time.monotonic()

        async def routable() -> bool:
            live = {w.worker_id for w in (await client.status()).workers}
            return {w.worker_id for w in prefills} <= live
        await wait_until(routable, timeout_s=15, what="the prefill workers routable again")
        # one at a time: on an idle cluster the router pairs workers as it did before the
        # stall (both roles rotate in step), so these reuse the pairs linked before
        results = [await client.complete(token_ids=p, max_tokens=3, ignore_eos=True,
                                         timeout=60) for p in prompts]
        healed_in = time.monotonic() - woke
    for p, result in zip(prompts, results, strict=True):
        assert result.token_ids == expected(tiny_llama, p, 3)
    assert healed_in < 15, f"requests succeeded only {healed_in:.1f} s after SIGCONT"
    relinked = [w.name for w in prefills
                if scrape(w)["tandem_kv_transfer_peers_connected_total"] > links[w.name]]
    assert sorted(relinked) == sorted(w.name for w in prefills), (links, relinked)
    await wait_until(lambda: blocks_all_free(slow_cluster), what="no blocks leaked")


async def test_prefill_worker_killed_requests_are_retried(slow_cluster: LocalCluster,
                                                          tiny_llama: Path) -> None:
    prompts = [prompt(100 + i, 60) for i in range(8)]
    async with RouterClient(slow_cluster.router_address) as client:
        tasks = [asyncio.create_task(client.complete(token_ids=p, max_tokens=3,
                                                     ignore_eos=True, timeout=120))
                 for p in prompts]
        busy: list[str] = []

        async def prefilling() -> bool:  # 64-token chunks of >= 150 ms each: ~1 s of work
            stats = await all_counters(slow_cluster)
            busy[:] = [n for n, c in stats.items() if n.startswith("prefill") and c["requests"]]
            return bool(busy)
        await wait_until(prefilling, timeout_s=10, what="requests on a prefill worker")
        victim = next(p for p in slow_cluster.workers("prefill") if p.name == busy[0])
        slow_cluster.kill(victim)
        results: list[Completion] = await asyncio.gather(*tasks)
        status = await client.status()
    for p, result in zip(prompts, results, strict=True):
        assert result.token_ids == expected(tiny_llama, p, 3)
    assert status.counters["retries"] >= 1
    assert victim.worker_id not in {w.worker_id for w in status.workers}
    await wait_until(lambda: blocks_all_free(slow_cluster),
                     what="no blocks leaked on the surviving workers")


async def test_decode_worker_killed_its_requests_migrate(slow_cluster: LocalCluster,
                                                         tiny_llama: Path) -> None:
    """Every request survives: those on the killed worker continue on the other one with
    the tokens so far (tests/e2e/test_migration.py has the single-request cases)."""
    prompts = [prompt(200 + i) for i in range(12)]
    decoders = slow_cluster.workers("decode")
    async with RouterClient(slow_cluster.router_address) as client:
        async def both_live() -> bool:
            live = {w.worker_id for w in (await client.status()).workers}
            return {d.worker_id for d in decoders} <= live
        await wait_until(both_live, what="both decode workers routable")
        tasks = [asyncio.create_task(client.complete(token_ids=p, max_tokens=40,
                                                     ignore_eos=True, timeout=120))
                 for p in prompts]

        async def both_decoding() -> bool:  # 40 steps of >= 150 ms: seconds of decoding
            stats = await all_counters(slow_cluster)
            return all(stats[d.name]["running"] > 0 for d in decoders)
        await wait_until(both_decoding, timeout_s=20, what="requests on both decode workers")
        victim = decoders[0]
        slow_cluster.kill(victim)
        results = await asyncio.gather(*tasks)
        status = await client.status()
    for p, result in zip(prompts, results, strict=True):
        assert result.token_ids == expected(tiny_llama, p, 40)
        assert result.completion_tokens == 40 and result.prompt_tokens == len(p)
    assert status.counters["migrations/unreachable"] >= 1

    async def survivors_clean() -> bool:
        stats = await all_counters(slow_cluster)
        return all(c["kv_blocks_free"] == c["kv_blocks_total"] and c["requests"] == 0
                   for c in stats.values())
    await wait_until(survivors_clean, what="no blocks leaked on the surviving workers")


async def odd_prefill_worker_is_listed_and_unused(
        cluster: LocalCluster, tiny_llama: Path, args: list[str], first_prompt: int,
        check_status: Callable[[router_pb2.GetClusterStatusResponse, str], None]) -> None:
    """Spawns a prefill worker with `args`: it must show up in the pair errors (then
    `check_status(status, its id)`), requests must still succeed, and it must prefill none."""
    odd = cluster.spawn("prefill", args)
    cluster.wait_ready(odd)
    async with RouterClient(cluster.router_address) as client:
        async def listed() -> bool:
            status = await client.status()
            return any(e.prefill_worker_id == odd.worker_id for e in status.pair_errors)
        await wait_until(listed, what="the pair error in cluster status")
        check_status(await client.status(), odd.worker_id)
        for i in range(first_prompt, first_prompt + 4):
            result = await client.complete(token_ids=prompt(i), max_tokens=2, ignore_eos=True)
            assert result.token_ids == expected(tiny_llama, prompt(i), 2)
    assert (await counters(odd)).get("prefill_requests", 0) == 0
    await wait_until(lambda: blocks_all_free(cluster), what="every live worker's blocks free")


async def test_mismatched_prefill_worker_is_never_used(slow_cluster: LocalCluster,
                                                       tiny_llama: Path) -> None:
    def check(status: router_pb2.GetClusterStatusResponse, odd_id: str) -> None:
        assert "block size 32" in status.worker_errors[odd_id]
    await odd_prefill_worker_is_listed_and_unused(slow_cluster, tiny_llama,
                                                  ["--block-size", "32"], 300, check)


async def test_prefill_worker_with_other_layer_groups_is_never_used(
        slow_cluster: LocalCluster, tiny_llama: Path) -> None:
    def check(status: router_pb2.GetClusterStatusResponse, odd_id: str) -> None:
        errors = [e.message for e in status.pair_errors if e.prefill_worker_id == odd_id]
        assert errors and all("layer_group 2 vs 1" in m for m in errors), errors
    # the cluster's other workers run --kv-layer-group 1
    await odd_prefill_worker_is_listed_and_unused(slow_cluster, tiny_llama,
                                                  ["--kv-layer-group", "2"], 400, check)


async def test_sigterm_finishes_in_flight_requests_then_deregisters(
        tiny_llama: Path, tmp_path: Path) -> None:
    with LocalCluster(tiny_llama, prefill=1, decode=1, log_dir=tmp_path,
                      worker_args=["--num-blocks", "64", "--step-delay-ms", "100",
                                   "--shutdown-grace-s", "30"]) as cluster:
        decode = cluster.workers("decode")[0]
        async with RouterClient(cluster.router_address) as client:
            tokens: list[int] = []
            async for chunk in client.generate(token_ids=prompt(7), max_tokens=25,
                                               ignore_eos=True, timeout=60):
                tokens += chunk.token_ids
                if len(tokens) == 2:  # decoding now (25 steps of >= 100 ms): SIGTERM it
                    decode.popen.terminate()
            assert tokens == expected(tiny_llama, prompt(7), 25)
            assert decode.popen.wait(timeout=30) == 0

            async def gone() -> bool:
                return all(w.worker_id != decode.worker_id
                           for w in (await client.status()).workers)
            await wait_until(gone, what="the stopped worker to leave the cluster status")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.complete(token_ids=[5, 6], max_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "decode" in (caught.value.details() or "")
        await wait_until(lambda: blocks_all_free(cluster),
                         what="the prefill worker's blocks free after the decode worker left")
