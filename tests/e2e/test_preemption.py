"""Preemption in the decode role end to end: a decode worker whose KV cache holds the prompts
but not their growth preempts and recomputes, and every client still gets the tokens of an
undisturbed run; counted in its status and /metrics; no block leaked.

Real processes on loopback: redis-server, a prefill and a decode worker with 10 blocks of 16
tokens each, the router. Six requests of 20 prompt tokens (2 blocks reserved each) and 44 new
tokens (4 blocks each at the end): at most 5 fit as reservations, and those cannot all grow.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from tests.e2e.helpers import blocks_all_free, counters, expected, scrape, wait_until

pytestmark = pytest.mark.timeout(300)

NEW = 44


async def test_a_small_decode_cache_preempts_and_keeps_every_token(
        tiny_llama: Path, tmp_path: Path) -> None:
    prompts = [torch.randint(3, 500, (20,), generator=torch.Generator().manual_seed(900 + i))
               .tolist() for i in range(6)]
    # a step delay keeps the six decoding together (44 steps of >= 20 ms)
    with LocalCluster(tiny_llama, prefill=1, decode=1, log_dir=tmp_path,
                      worker_args=["--num-blocks", "10", "--step-delay-ms", "20"]) as cluster:
        decode = cluster.workers("decode")[0]
        async with RouterClient(cluster.router_address) as client:
            results = await asyncio.gather(*(
                client.complete(token_ids=p, max_tokens=NEW, ignore_eos=True, timeout=120)
                for p in prompts))
            # one that could not fit even alone: refused at once, naming the field, no hang
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.complete(token_ids=prompts[0], max_tokens=200, ignore_eos=True,
                                      timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_tokens" in (refused.value.details() or "")
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            assert result.token_ids == expected(tiny_llama, prompt, NEW), f"request {i}"
        status = await counters(decode)
        assert status["preemptions"] > 0
        assert scrape(decode)["tandem_num_preemptions_total"] == status["preemptions"]
        await wait_until(lambda: blocks_all_free(cluster), what="every block free again")
