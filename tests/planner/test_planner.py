"""planner.loop: readings from a router, replica counts read and patched through the Kubernetes
API's scale subresource.

No real API server can run here (no kube-apiserver, no etcd, no cluster), so the official
`kubernetes` client talks real HTTP to a stand-in served on loopback (`tests/support/kube_api`,
found through a kubeconfig file); the router is a real gRPC server answering GetClusterStatus
with recorded figures, and its /metrics a real Prometheus endpoint with the router's metrics.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from grpc import aio
from kubernetes.aio.client import ApiClient
from prometheus_client import CollectorRegistry

from cluster.grpc_server import GrpcServer, ServiceBinding, start_server
from cluster.kube_client import api_client
from cluster.roles import Role
from observability.metrics import RouterMetrics, serve_metrics
from planner.config import PlannerConfig
from planner.figures import figures_from_status
from planner.loop import Planner
from planner.read import RouterReader
from planner.scale import DeploymentScaler
from router.api_tokens import ApiTokens, public_interceptor
from tandem_proto.tandem.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.support.kube_api import KubeApiStandIn

NS = "serving"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class RecordedRouter(router_pb2_grpc.RouterServicer):
    """Answers GetClusterStatus with `status`, which the test sets before each reading."""

    status: router_pb2.GetClusterStatusResponse = field(
        default_factory=router_pb2.GetClusterStatusResponse)

    async def GetClusterStatus(self, request: router_pb2.GetClusterStatusRequest,
                               context: aio.ServicerContext,
                               ) -> router_pb2.GetClusterStatusResponse:
        return self.status


def status(prefill_queued_blocks: int, decode_kv_used: int) -> router_pb2.GetClusterStatusResponse:
    """One prefill and one decode worker: a prompt queue, and KV blocks used of 100."""
    return router_pb2.GetClusterStatusResponse(workers=[
        common_pb2.WorkerStatus(worker_id="p-0", role=common_pb2.WORKER_ROLE_PREFILL,
                                load=common_pb2.WorkerLoad(
                                    queued_prompt_blocks=prefill_queued_blocks)),
        common_pb2.WorkerStatus(worker_id="d-0", role=common_pb2.WORKER_ROLE_DECODE,
                                load=common_pb2.WorkerLoad(kv_blocks_used=decode_kv_used,
                                                           kv_blocks_total=100,
                                                           max_running=64))])


@pytest.fixture
async def kube() -> AsyncIterator[KubeApiStandIn]:
    standin = KubeApiStandIn()
    standin.scales = {(NS, "tandem-prefill"): 1, (NS, "tandem-decode"): 2}
    await standin.start()
    yield standin
    await standin.close()


@pytest.fixture
async def router() -> AsyncIterator[tuple[RecordedRouter, GrpcServer]]:
    servicer = RecordedRouter()
    server = await start_server([ServiceBinding(
        "tandem.v1.Router", router_pb2_grpc.add_RouterServicer_to_server, servicer)])
    yield servicer, server
    await server.stop(0)


@pytest.fixture
async def api(kube: KubeApiStandIn, tmp_path: Path) -> AsyncIterator[ApiClient]:
    client = await api_client(str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    yield client
    await client.close()


def planner_config(router: GrpcServer, **overrides: object) -> PlannerConfig:
    base = PlannerConfig(router=router.address, kubernetes_namespace=NS, min_prefill=1,
                         max_prefill=3, min_decode=1, max_decode=3, up_after=2, down_after=2,
                         cooldown_s=60.0, prefill_queue_blocks_target=10.0)
    return replace(base, **overrides)  # type: ignore[arg-type]


async def test_planner_patches_the_deployments_scale(
        kube: KubeApiStandIn, router: tuple[RecordedRouter, GrpcServer],
        api: ApiClient) -> None:
    recorded, server = router
    config = planner_config(server)
    reader = RouterReader(config)
    planner = Planner(config, reader, DeploymentScaler(config, api))
    try:
        recorded.status = status(prefill_queued_blocks=25, decode_kv_used=50)  # prefill 2.5
        assert (await planner.step(now_s=0.0)).changes() == []  # type: ignore[union-attr]
        assert kube.patches() == []
        await planner.step(now_s=15.0)  # the second reading above the mark: up
        [patch] = kube.patches()
        assert patch.path == f"/apis/apps/v1/namespaces/{NS}/deployments/tandem-prefill/scale"
        assert patch.body == {"spec": {"replicas": 2}}
        assert patch.content_type == "application/strategic-merge-patch+json"
        assert kube.scales[(NS, "tandem-prefill")] == 2

        await planner.step(now_s=30.0)
        await planner.step(now_s=45.0)  # still hot, in cooldown: nothing
        assert len(kube.patches()) == 1

        recorded.status = status(prefill_queued_blocks=5, decode_kv_used=10)  # decode cold
        await planner.step(now_s=60.0)
        await planner.step(now_s=75.0)
        patches = kube.patches()
        assert [(p.path.split("/")[-2], p.body) for p in patches[1:]] == [
            ("tandem-decode", {"spec": {"replicas": 1}})]
        assert kube.scales == {(NS, "tandem-prefill"): 2, (NS, "tandem-decode"): 1}
        scale_reads = [r for r in kube.requests if r.method == "GET"]
        assert len(scale_reads) == 2 * 6  # both Deployments' scale, at every reading
    finally:
        await reader.close()


async def test_the_planner_reads_a_router_that_wants_a_token_with_its_token() -> None:
    """A router with `api_tokens_file` refuses GetClusterStatus without a bearer token: the
    planner sends its `api_token`."""
    servicer = RecordedRouter(status=status(prefill_queued_blocks=5, decode_kv_used=10))
    server = await start_server(
        [ServiceBinding("tandem.v1.Router", router_pb2_grpc.add_RouterServicer_to_server,
                        servicer)],
        interceptors=[public_interceptor(ApiTokens((b"s3cret",)), lambda api: None)])
    without, wrong, right = (RouterReader(planner_config(server, api_token=token))
                             for token in (None, "nope", "s3cret"))
    try:
        for reader in (without, wrong):
            with pytest.raises(aio.AioRpcError) as refused:
                await reader.read()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        figures = await right.read()
        assert figures == figures_from_status(servicer.status, None)
    finally:
        for reader in (without, wrong, right):
            await reader.close()
        await server.stop(0)


async def test_dry_run_patches_nothing(kube: KubeApiStandIn,
                                       router: tuple[RecordedRouter, GrpcServer],
                                       api: ApiClient) -> None:
    recorded, server = router
    config = planner_config(server, dry_run=True)
    reader = RouterReader(config)
    planner = Planner(config, reader, DeploymentScaler(config, api))
    recorded.status = status(prefill_queued_blocks=25, decode_kv_used=50)
    try:
        await planner.step(now_s=0.0)
        plan = await planner.step(now_s=15.0)
        assert plan is not None and [(d.role, d.target) for d in plan.changes()] == [
            (Role.PREFILL, 2)]
        assert kube.patches() == []
    finally:
        await reader.close()


async def test_no_reading_changes_nothing(kube: KubeApiStandIn,
                                          router: tuple[RecordedRouter, GrpcServer],
                                          api: ApiClient,
                                          caplog: pytest.LogCaptureFixture) -> None:
    recorded, server = router
    config = planner_config(server)
    reader = RouterReader(config)
    planner = Planner(config, reader, DeploymentScaler(config, api))
    recorded.status = status(prefill_queued_blocks=25, decode_kv_used=50)
    kube.forbidden = True  # the planner's Role lacks deployments/scale
    try:
        assert await planner.step(now_s=0.0) is None
        assert await planner.step(now_s=15.0) is None
        assert planner.failures == 2 and kube.patches() == []
        assert "403" in caplog.text
    finally:
        await reader.close()


async def test_ttft_between_readings_from_the_router_metrics(
        router: tuple[RecordedRouter, GrpcServer]) -> None:
    recorded, server = router
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    endpoint = serve_metrics(registry)
    config = planner_config(server, router_metrics_url=f"http://{endpoint.address}/metrics",
                            ttft_target_s=0.5)
    reader = RouterReader(config)
    recorded.status = status(prefill_queued_blocks=0, decode_kv_used=50)
    try:
        metrics.first_token(10.0)  # before the first reading: not in any interval
        assert (await reader.read()).ttft_s is None
        metrics.first_token(1.0)
        metrics.first_token(2.0)
        figures = await reader.read()
        assert figures.ttft_s == pytest.approx(1.5)
        assert (await reader.read()).ttft_s is None  # no first token in between
    finally:
        await reader.close()
        endpoint.close()


def test_tandem_scale_takes_every_field_as_a_flag() -> None:
    def tandem(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    shown = tandem("scale", "--help")
    assert shown.returncode == 0, shown.stderr
    for flag in ("--router", "--max-decode", "--high-water", "--cooldown-s", "--dry-run",
                 "TANDEM_MAX_TOTAL_REPLICAS"):
        assert flag in shown.stdout
    bad = tandem("scale", "--router", "r:1", "--min-decode", "3", "--max-decode", "2")
    assert bad.returncode == 2 and "max_decode: must be >=" in bad.stderr
