"""Helpers for end-to-end tests: worker status over gRPC, /metrics, polling, the HF referee."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from cli.local_cluster import LocalCluster, ServiceProcess
from cluster.cluster_secret import LOCAL_DEV_TOKEN, METADATA_KEY, credential
from tandem_proto.tandem.v1 import common_pb2, worker_pb2_grpc
from tests.engine.hf_reference import hf_greedy


def cluster_auth(secret: str = LOCAL_DEV_TOKEN) -> list[tuple[str, str]]:
    """The metadata the workers' internal services require (the router's, for the cluster
    secret `secret`; a local cluster's is the development secret)."""
    return [(METADATA_KEY, credential(secret))]


async def worker_status(process: ServiceProcess, secret: str = LOCAL_DEV_TOKEN,
                        ) -> common_pb2.WorkerStatus:
    """A worker's `tandem.v1.Worker` status, asked of the worker itself."""
    async with aio.insecure_channel(process.address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).Status(
            common_pb2.StatusRequest(), timeout=5, metadata=cluster_auth(secret))


async def counters(process: ServiceProcess) -> dict[str, float]:
    """A worker's status counters and gauges in one dict, asked of the worker itself."""
    status = await worker_status(process)
    return {**status.counters, **status.gauges}


def scrape(process: ServiceProcess) -> dict[str, float]:
    """A process's /metrics samples, summed over their labels, by sample name."""
    url = f"http://{process.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    sums: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] += sample.value
    return dict(sums)


async def all_counters(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    procs = cluster.workers("prefill") + cluster.workers("decode") + cluster.workers("aggregated")
    results = await asyncio.gather(*(counters(p) for p in procs))
    return {p.name: c for p, c in zip(procs, results, strict=True)}


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def blocks_all_free(cluster: LocalCluster) -> bool:
    """Every live worker has every KV block free (no leak) and no request left."""
    stats = await all_counters(cluster)
    return all(c["kv_blocks_free"] == c["kv_blocks_total"] and c["requests"] == 0
               for c in stats.values())


def expected(model: Path, prompt: list[int], max_tokens: int) -> list[int]:
    return hf_greedy(model, prompt, max_tokens)
