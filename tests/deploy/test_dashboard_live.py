"""The dashboard against a running cluster: a real Prometheus scrapes every process of a real
local cluster (redis-server, a prefill and a decode worker, the router) on loopback; after
some traffic, every dashboard expression is valid and returns data, the main series count
what the traffic did, and each process's `/metrics` passes `promtool check metrics`.

Needs the services wired to `observability.metrics`: `LocalCluster(..., metrics=True)` starts each
process with a `/metrics` endpoint and sets `ServiceProcess.metrics_address` ("host:port").
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.local_cluster import LocalCluster
from cli.router_client import RouterClient
from observability.dashboard import dashboard_exprs
from tests.deploy.conftest import ALERTS, DASHBOARD
from tests.support.prometheus_server import LocalPrometheus, PromQLError, promtool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PREFIX = list(range(3, 67))  # 64 shared tokens: 4 full blocks of 16, reused across requests

# Series the traffic below must have moved (not just exported at 0): query → minimum value.
MOVED = {
    "sum(tandem_time_to_first_token_seconds_count)": 8,
    "sum(tandem_inter_token_latency_seconds_count)": 8,
    "sum(tandem_e2e_request_latency_seconds_count)": 8,
    "sum(tandem_time_per_output_token_seconds_count)": 8,
    'sum(tandem_requests_total{outcome="length"})': 8,
    'sum(tandem_requests_total{outcome="INVALID_ARGUMENT"})': 1,
    "sum(tandem_requests_received_total)": 9,
    "sum(tandem_prompt_tokens_total)": 8 * len(PREFIX),
    "sum(tandem_generation_tokens_total)": 8 * 6,
    "sum(tandem_router_queue_time_seconds_count)": 8,
    "sum(tandem_router_decisions_total)": 8,
    "sum(tandem_router_prefix_query_blocks_total)": 8,
    'sum(tandem_router_index_mode{mode="exact"})': 1,
    'min(tandem_router_live_workers{role="prefill"})': 1,
    'min(tandem_router_live_workers{role="decode"})': 1,
    'sum(tandem_prompt_tokens_computed_total{role="prefill"})': len(PREFIX),
    'sum(tandem_prefix_cache_hit_tokens_total{role="prefill"})': 16,
    'sum(tandem_step_duration_seconds_count{role="prefill"})': 1,
    'sum(tandem_step_duration_seconds_count{role="decode"})': 1,
    'sum(tandem_prefill_batch_tokens_count{role="prefill"})': 1,
    'sum(tandem_decode_batch_size_count{role="decode"})': 1,
    'sum(tandem_kv_blocks_capacity{role="decode"})': 1,
    'sum(tandem_kv_blocks_free{role="decode"})': 1,
    "sum(tandem_prefill_requests_total)": 8,
    "sum(tandem_decode_reservations_total)": 8,
    'sum(tandem_kv_transfer_bytes_total{direction="sent",role="prefill"})': 1,
    'sum(tandem_kv_transfer_bytes_total{direction="received",role="decode"})': 1,
    'sum(tandem_kv_transfer_latency_seconds_count{op="write",role="prefill"})': 1,
    'sum(tandem_kv_transfer_latency_seconds_count{op="request",role="decode"})': 1,
}


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("metrics-cluster-logs")
    with LocalCluster(tiny_llama, prefill=1, decode=1, log_dir=logs, metrics=True,
                      worker_args=["--num-blocks", "128"]) as running:
        yield running


def metrics_targets(cluster: LocalCluster) -> list[str]:
    targets = [p.metrics_address for p in cluster.processes if p.alive]
    assert len(targets) == 3 and all(t and ":" in t for t in targets), targets
    return targets


async def traffic(address: str, rounds: int) -> None:
    """`rounds` × 4 requests sharing a 64-token prefix, 6 tokens each, plus one bad request."""
    async with RouterClient(address) as client:
        for r in range(rounds):
            await asyncio.gather(*(client.complete(
                token_ids=[*PREFIX, 100 + 4 * r + i], max_tokens=6, ignore_eos=True, timeout=120)
                for i in range(4)))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await client.complete(token_ids=[10**9], max_tokens=2, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_dashboard_on_a_running_cluster(cluster: LocalCluster) -> None:
    targets = metrics_targets(cluster)
    for target in targets:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        result = promtool("check", "metrics", stdin=text)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            f"{target}: {result.stdout}{result.stderr}")

    with LocalPrometheus(targets, rule_files=[ALERTS]) as prom:
        prom.wait_for_scrape(timeout_s=60)
        asyncio.run(traffic(cluster.router_address, rounds=1))
        time.sleep(3)  # a few scrapes apart, so rate() sees increases
        asyncio.run(traffic(cluster.router_address, rounds=1))
        prom.wait_for_scrape(scrapes=4)

        assert {t: "up" for t in targets} == prom.targets_health()
        low = {}
        for query, minimum in MOVED.items():
            result = prom.query(query)["result"]
            got = float(result[0]["value"][1]) if result else None
            if got is None or got < minimum:
                low[query] = (got, minimum)
        assert not low, f"series the traffic should have moved (got, want at least): {low}"

        empty, invalid = [], []
        for title, expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
            try:
                if not prom.query(expr)["result"]:
                    empty.append(f"{title}: {expr}")
            except PromQLError as error:
                invalid.append(f"{title}: {error}")
        assert not invalid, "\n".join(invalid)
        assert not empty, "no data:\n" + "\n".join(empty)

        groups = prom.api("rules")["data"]["groups"]
        bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
               if r["health"] == "err"]
        assert not bad, bad
