"""No step of a request waits for an idle worker's engine-thread poll (`--idle-wait-s`).

One prefill and one decode sim worker with every cost zero and the idle wait set to a minute,
on each transfer backend. Before every request both workers sit idle long enough to be back
in that wait, so anything on the request path that needs their next poll (a write's
completion needing the receiver's progress, a KV-ready event, the sender's WRITE_DONE, a
peer's first connection) would take up to a minute. Every request, the first on a cold pair
included, must take a small fraction of it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from tests.e2e.helpers import all_counters

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

IDLE_WAIT_S = 60.0
ZERO_COST = ["--sim-step-s", "0", "--sim-prefill-token-s", "0", "--sim-decode-seq-s", "0",
             "--sim-decode-context-token-s", "0"]


@pytest.mark.parametrize("backend", ["nixl", "ucxx"])
async def test_requests_do_not_wait_for_the_idle_poll(tiny_llama: Path, tmp_path: Path,
                                                      backend: str) -> None:
    with LocalCluster(tiny_llama, prefill=1, decode=1, log_dir=tmp_path, metrics=False,
                      worker_args=["--engine", "sim", "--num-blocks", "64", *ZERO_COST,
                                   "--idle-wait-s", str(IDLE_WAIT_S),
                                   "--transfer-backend", backend]) as cluster:
        async with RouterClient(cluster.router_address) as client:
            took = []
            for i in range(4):
                await asyncio.sleep(0.5)  # both engine threads back in their idle wait
                began = time.monotonic()
                result = await client.complete(token_ids=[3 + i, *range(10, 30)],
                                               max_tokens=2, timeout=2 * IDLE_WAIT_S)
                took.append(time.monotonic() - began)
                assert result.finish_reason == "length"
            stats = await all_counters(cluster)
        # generous for a loaded 2-core box (a request takes ~10-300 ms there); a wait for the
        # idle poll would take up to the whole minute
        assert max(took) < IDLE_WAIT_S / 6, took
        [decode] = [c for name, c in stats.items() if name.startswith("decode")]
        assert decode["transfers_completed"] == 4  # every request's KV crossed the backend
