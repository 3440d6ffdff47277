"""`tandem up`'s supervisor on a real local cluster, with the transfer links healing: a decode
worker killed (SIGKILL) while a prefill worker is about to push KV into it. The transfer fails
partway (ABORTED), the router retries the request on the other decode worker, the supervisor
starts the dead worker again on the same ports (gRPC and KV transfer), the prefill worker
reconnects to the new process with nothing else restarted, and requests succeed on it; every
worker's blocks are free at the end.

Workers run with an injected per-step delay (`--step-delay-ms`) so that a reservation is
reliably waiting for its KV when the kill lands (tests/e2e/test_failures.py does the same).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from cli.local_cluster import LocalCluster
from cli.router_client import Completion, RouterClient
from cli.supervisor import RestartPolicy, Supervisor, supervise
from tests.e2e.helpers import all_counters, blocks_all_free, counters, expected, wait_until

pytestmark = pytest.mark.timeout(300)


def prompt(seed: int, n: int = 60) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def supervised(tiny_llama: Path, tmp_path: Path) -> Iterator[tuple[LocalCluster, list[str]]]:
    """One prefill and two decode workers under `tandem up`'s supervisor (fast backoff); the
    supervisor's report lines."""
    cluster = LocalCluster(tiny_llama, prefill=1, decode=2, log_dir=tmp_path / "logs",
                           worker_args=["--num-blocks", "192", "--step-delay-ms", "150",
                                        "--max-num-batched-tokens", "64",
                                        "--kv-layer-group", "1", "--shutdown-grace-s", "2"])
    lines: list[str] = []
    stop = threading.Event()
    result: list[Supervisor] = []
    with cluster:
        thread = threading.Thread(target=lambda: result.append(supervise(
            cluster, stop, RestartPolicy(initial_backoff_s=0.2, max_backoff_s=2.0),
            lines.append, interval_s=0.1)))
        thread.start()
        try:
            yield cluster, lines
        finally:
            stop.set()
            thread.join()


async def test_a_decode_worker_killed_mid_transfer_is_restarted_and_reconnected(
        supervised: tuple[LocalCluster, list[str]], tiny_llama: Path) -> None:
    cluster, lines = supervised
    (prefill,) = cluster.workers("prefill")
    decoders = cluster.workers("decode")
    prompts = [prompt(500 + i) for i in range(6)]
    async with RouterClient(cluster.router_address) as client:
        tasks = [asyncio.create_task(client.complete(token_ids=p, max_tokens=3,
                                                     ignore_eos=True, timeout=120))
                 for p in prompts]
        waiting: list[str] = []

        async def kv_awaited() -> bool:  # a reservation whose KV the prefill worker owes
            stats = await all_counters(cluster)
            waiting[:] = [d.name for d in decoders if stats[d.name]["reservations_waiting"]]
            return bool(waiting)
        await wait_until(kv_awaited, timeout_s=20, what="a decode worker awaiting KV")
        victim = next(d for d in decoders if d.name == waiting[0])
        cluster.kill(victim)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for p, result in zip(prompts, results, strict=True):
            if isinstance(result, Completion):
                assert result.token_ids == expected(tiny_llama, p, 3)
            else:  # only a request already decoding on the victim may fail, and says so
                assert isinstance(result, grpc.aio.AioRpcError), result
                assert result.code() == grpc.StatusCode.UNAVAILABLE
                assert victim.worker_id in (result.details() or "")
        assert (await client.status()).counters["retries"] >= 1  # the ABORTED transfer

        # the supervisor starts it again, on the same ports; the router takes it back
        await wait_until(lambda: asyncio.sleep(0, victim.restarts >= 1), timeout_s=30,
                         what="the supervisor restarting the victim")
        assert any(line.startswith(f"{victim.name} exited with code -9") for line in lines)
        assert any(line.startswith(f"restarted {victim.name}") for line in lines)
        await asyncio.to_thread(cluster.wait_ready, victim)

        async def routable() -> bool:
            status = await client.status()
            return victim.worker_id in {w.worker_id for w in status.workers}
        await wait_until(routable, timeout_s=30, what="the router routing to the victim again")

        # requests reach the new process: the prefill worker (never restarted) reconnected
        seed = 600
        while (await counters(victim)).get("transfers_completed", 0) < 1:
            assert seed < 640, "no request reached the restarted decode worker"
            batch = [prompt(seed + i, 40) for i in range(4)]
            seed += 4
            done = await asyncio.gather(*(client.complete(token_ids=p, max_tokens=2,
                                                          ignore_eos=True, timeout=120)
                                          for p in batch))
            for p, result in zip(batch, done, strict=True):
                assert result.token_ids == expected(tiny_llama, p, 2)
        status = await client.status()
        # the index noticed: the new incarnation's reset, or the lapsed heartbeat's drop
        assert status.counters["index_resyncs/restart"] + status.counters["index_drops"] >= 1
    assert prefill.restarts == 0 and prefill.alive
    await wait_until(lambda: blocks_all_free(cluster), what="every worker's blocks free")
