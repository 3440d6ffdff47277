"""The router process built with `--discovery kubernetes`: the pod watch feeds its pool, its
fallback metrics are exported, and a 403 reaches `GetClusterStatus.discovery_problem`.

No real API server can run here, so the official client talks real HTTP to the loopback
stand-in of tests/support/kube_api (through a kubeconfig file); Redis (the prefix index) is a
real redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cli.redis_server import LocalRedisServer
from discovery.kubernetes import PodWatcher
from router.__main__ import build_router
from router.config import router_flags
from router.service import RouterServicer
from tandem_proto.tandem.v1 import router_pb2
from tests.support.kube_api import KubeApiStandIn, worker_pod


@pytest.fixture
def redis_server() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as server:
        yield server


@pytest.fixture
async def api() -> AsyncIterator[KubeApiStandIn]:
    standin = KubeApiStandIn()
    await standin.start()
    yield standin
    await standin.close()


async def test_router_with_kubernetes_discovery(tiny_llama: Path,
                                                redis_server: LocalRedisServer,
                                                api: KubeApiStandIn, tmp_path: Path) -> None:
    api.apply(worker_pod("tandem-prefill-0", "prefill", port=1, namespace="serving"))
    flags = router_flags()
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    config = flags.build(parser.parse_args([
        "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")),
        "--kubernetes-retry-s", "0.05", "--insecure-plaintext"]), environ={
        "TANDEM_MODEL": str(tiny_llama), "TANDEM_REDIS_URL": redis_server.url,
        "TANDEM_DISCOVERY": "kubernetes", "TANDEM_KUBERNETES_NAMESPACE": "serving"})
    router = await build_router(config)
    try:
        watcher = router.pool.registry
        assert isinstance(watcher, PodWatcher)
        assert set(router.pool.workers) == {"tandem-prefill-0"}  # listed (nothing answers)
        assert router.registry.get_sample_value("tandem_router_discovery_errors_total") == 0

        api.forbidden = True
        api.drop_watches()
        async with asyncio.timeout(20):  # a miss fails here, not at the suite's timeout
            while not watcher.forbidden:
                await asyncio.sleep(0.02)
        status = await RouterServicer(router).GetClusterStatus(
            router_pb2.GetClusterStatusRequest(), None)  # type: ignore[arg-type]
        assert "403 Forbidden" in status.discovery_problem
        assert "get, list and watch on pods" in status.discovery_problem
        assert router.registry.get_sample_value("tandem_router_discovery_forbidden_total") >= 1  # type: ignore[operator]
        assert set(router.pool.workers) == {"tandem-prefill-0"}  # kept
    finally:
        await router.close()
