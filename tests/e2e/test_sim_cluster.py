"""A cluster of 16 simulated workers (`--engine sim`) starts within bounded time and serves
requests through every real path — reservations, KV transfers of the stand-in blocks, the
aggregated workers' local prefills — with the same tokens as the sim engine in process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.e2e.helpers import all_counters, blocks_all_free, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


async def test_16_sim_workers_start_and_serve(tiny_llama: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    # no /metrics servers: half the ports picked ahead of their bind (free_port), which other
    # processes' ephemeral binds (NIXL/UCX listeners) can take in between
    with LocalCluster(tiny_llama, prefill=6, decode=6, aggregated=4, log_dir=tmp_path,
                      worker_args=["--engine", "sim", "--num-blocks", "256"],
                      start_timeout_s=240, metrics=False) as cluster:
        assert time.monotonic() - started < 240
        prompts = [[3 + (i * 7 + j) % 400 for j in range(10 + 3 * i)] for i in range(48)]
        async with RouterClient(cluster.router_address) as client:
            results = await asyncio.gather(*(
                client.complete(token_ids=p, max_tokens=12, timeout=120) for p in prompts))
        reference = Engine(tiny_llama, EngineConfig(engine="sim", num_blocks=512))
        want = reference.generate(prompts, SamplingParams(max_tokens=12))
        assert [r.token_ids for r in results] == want  # no EOS: every one runs to max_tokens
        assert all(r.finish_reason == "length" for r in results)
        stats = await all_counters(cluster)
        decode = [c for name, c in stats.items() if name.startswith("decode")]
        aggregated = [c for name, c in stats.items() if name.startswith("aggregated")]
        assert sum(c["transfers_completed"] for c in decode) >= 1
        assert sum(c["kv_bytes_received"] for c in decode) > 0  # stand-in blocks moved
        assert sum(c["routed_prefills"] for c in aggregated) >= 1
        await wait_until(lambda: blocks_all_free(cluster), what="every block free again")
