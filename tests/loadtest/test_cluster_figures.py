"""loadtest.cluster_figures: the cluster's figures from two statuses, aggregated workers too, and
the /metrics pages they come from, https included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from cli.throwaway_ca import write_cluster_certs
from loadtest.cluster_figures import figures, scrape
from loadtest.targets.tandem_grpc import ROLES
from observability.metrics import serve_metrics
from tandem_proto.tandem.v1 import common_pb2


def status(scale: float) -> dict[str, Any]:
    """A status as TandemTarget.cluster_status writes it, its counters multiplied by `scale`."""
    return {
        "policy": "kv_aware",
        "router": {"requests": 10 * scale, "local_prefills/aggregated": 6 * scale,
                   "local_prefills/short_prompt": 1 * scale},
        "workers": {
            "p": {"role": "prefill", "counters": {"kv_blocks_sent": 4 * scale,
                                                  "prefill_tokens_computed": 100 * scale,
                                                  "prefix_hit_tokens": 50 * scale}},
            "d": {"role": "decode", "counters": {"transfers_completed": 3 * scale,
                                                 "local_prefills": 1 * scale}},
            "a": {"role": "aggregated", "counters": {"prefill_tokens_computed": 200 * scale,
                                                     "prefix_hit_tokens": 50 * scale,
                                                     "local_prefills": 0.0}},
        },
    }


def test_aggregated_workers_count_and_local_prefills_are_the_routers() -> None:
    out = figures(status(1.0), status(2.0))
    assert out["requests"] == 10
    assert out["local_prefills"] == 7  # the router's, every reason
    assert out["fallback_prefills"] == 1  # the decode worker's own, after a failed transfer
    assert out["kv_blocks_sent"] == 4 and out["transfers_completed"] == 3
    assert out["prefill_tokens_computed"] == 300  # prefill + aggregated workers
    assert out["prefill_cached_ratio"] == 100 / 400


def test_every_worker_role_has_a_name() -> None:
    assert ROLES[common_pb2.WORKER_ROLE_AGGREGATED] == "aggregated"
    assert set(ROLES.values()) == {"prefill", "decode", "aggregated"}


async def test_an_https_metrics_page_is_read_with_its_ca(tmp_path: Path) -> None:
    """`--metrics-url https://...` with `--ca`: a real /metrics over TLS (as every Tandem
    process serves it with TLS on), read with the CA, refused without it."""
    certs = write_cluster_certs(tmp_path)
    registry = CollectorRegistry()
    Counter("tandem_demo", "a counter", registry=registry).inc(3)
    server = serve_metrics(registry, certfile=str(certs.cert), keyfile=str(certs.key))
    try:
        url = f"https://{server.address}/metrics"
        assert (await scrape(url, ca=str(certs.ca)))["tandem_demo_total"] == 3
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await scrape(url)  # the system's CAs do not know the throwaway one
    finally:
        server.close()
