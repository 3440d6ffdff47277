"""discovery.kubernetes: the router's worker set follows the worker pods through the Kubernetes
API: list, watch events, a dropped watch resumed, 410 Gone, 403 Forbidden.

No real API server can run here (no kube-apiserver, no etcd, no cluster), so the official
`kubernetes` client talks real HTTP to a stand-in served on loopback (`tests/support/kube_api`),
found through a kubeconfig file as in production. The pods point at real gRPC servers (the
scripted workers of tests/router/fakes.py), so the router's `WorkerPool` polls their Status as
it polls real workers, and `live()` is what routing sees.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cluster.roles import Role
from cluster.tls import PLAINTEXT
from discovery.config import KubernetesConfig
from discovery.kubernetes import PodWatcher
from observability.metrics import RouterMetrics
from router.config import RouterConfig
from router.sources import source_fallbacks
from router.workers import WorkerPool
from tests.router.fakes import FakeDecode, FakePrefill, FakeWorker, serve
from tests.support.kube_api import KubeApiStandIn, worker_pod

NS = "tandem"


@pytest.fixture
async def api() -> AsyncIterator[KubeApiStandIn]:
    standin = KubeApiStandIn()
    await standin.start()
    yield standin
    await standin.close()


@pytest.fixture
async def workers() -> AsyncIterator[dict[str, FakeWorker]]:
    """Real gRPC worker servers on loopback: prefill p-0, p-1 and decode d-0, d-1."""
    fakes: dict[str, FakeWorker] = {
        "p-0": FakePrefill("p-0", Role.PREFILL), "p-1": FakePrefill("p-1", Role.PREFILL),
        "d-0": FakeDecode("d-0", Role.DECODE), "d-1": FakeDecode("d-1", Role.DECODE)}
    for fake in fakes.values():
        await serve(fake, None)  # type: ignore[arg-type]
    yield fakes
    for fake in fakes.values():
        assert fake.server is not None
        await fake.server.stop(0)


def pod_of(fake: FakeWorker, ready: bool = True) -> dict[str, object]:
    assert fake.server is not None
    return worker_pod(fake.worker_id, fake.role.value, "127.0.0.1", fake.server.port, ready,
                      namespace=NS)


def router_config(api: KubeApiStandIn, tmp_path: Path) -> RouterConfig:
    kube = KubernetesConfig(kubernetes_namespace=NS,
                            kubeconfig=str(api.write_kubeconfig(tmp_path / "kubeconfig")),
                            kubernetes_retry_s=0.05)
    return RouterConfig(model="/m", redis_url="redis://unused", discovery="kubernetes",
                        kubernetes=kube, refresh_interval_s=0.05, status_timeout_s=0.5,
                        tls=PLAINTEXT)


@pytest.fixture
async def pool(api: KubeApiStandIn, tmp_path: Path) -> AsyncIterator[WorkerPool]:
    config = router_config(api, tmp_path)
    pool = WorkerPool(PodWatcher(config.kubernetes), config)
    yield pool
    await pool.close()


def watcher(pool: WorkerPool) -> PodWatcher:
    assert isinstance(pool.registry, PodWatcher)
    return pool.registry


def live(pool: WorkerPool) -> set[str]:
    return {h.worker_id for role in Role for h in pool.live(role)}


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_list_finds_ready_worker_pods_by_label(
        api: KubeApiStandIn, workers: dict[str, FakeWorker], pool: WorkerPool,
        caplog: pytest.LogCaptureFixture) -> None:
    api.apply(pod_of(workers["p-0"]))
    api.apply(pod_of(workers["d-0"]))
    api.apply(pod_of(workers["d-1"], ready=False))  # starting: not routed to yet
    api.apply(worker_pod("redis-0", None, namespace=NS))  # not a worker: the selector skips it
    api.apply(worker_pod("odd-0", "prefill", port=None, namespace=NS))  # no port named grpc
    api.apply(worker_pod("p-elsewhere", "prefill", namespace="other"))
    with caplog.at_level(logging.ERROR):
        await pool.start()  # the first list, then a Status poll of each pod's gRPC address

    assert set(pool.workers) == {"p-0", "d-0"}
    assert live(pool) == {"p-0", "d-0"}
    assert pool.workers["p-0"].address == f"127.0.0.1:{workers['p-0'].server.port}"  # type: ignore[union-attr]
    [listing] = api.list_requests()
    assert listing.path == f"/api/v1/namespaces/{NS}/pods"
    assert listing.params["labelSelector"] == "tandem.ai/role in (prefill,decode,aggregated)"
    assert "no container port named 'grpc'" in caplog.text
    assert watcher(pool).problem == ""


async def test_worker_set_follows_added_modified_and_deleted_pods(
        api: KubeApiStandIn, workers: dict[str, FakeWorker], pool: WorkerPool) -> None:
    await pool.start()
    assert pool.workers == {}
    await until(lambda: len(api.watch_requests()) == 1, "the watch")

    api.apply(pod_of(workers["p-0"]))  # ADDED, ready
    await until(lambda: live(pool) == {"p-0"}, "p-0 added")
    api.apply(pod_of(workers["d-0"], ready=False))  # ADDED, not ready
    api.apply(pod_of(workers["d-1"]))  # ADDED, ready
    await until(lambda: live(pool) == {"p-0", "d-1"}, "d-1 added, d-0 not ready")
    api.apply(pod_of(workers["d-0"]))  # MODIFIED: ready
    await until(lambda: live(pool) == {"p-0", "d-0", "d-1"}, "d-0 ready")
    api.apply(pod_of(workers["p-0"], ready=False))  # MODIFIED: ready → not ready
    await until(lambda: set(pool.workers) == {"d-0", "d-1"}, "p-0 not ready")
    api.apply(pod_of(workers["p-0"]))  # MODIFIED: ready again
    await until(lambda: live(pool) == {"p-0", "d-0", "d-1"}, "p-0 ready again")
    terminating = pod_of(workers["d-1"])
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # type: ignore[index]
    api.apply(terminating)  # MODIFIED: terminating (draining in its preStop hook)
    await until(lambda: set(pool.workers) == {"p-0", "d-0"}, "d-1 terminating")
    api.delete("d-0")  # DELETED
    await until(lambda: set(pool.workers) == {"p-0"}, "d-0 deleted")

    assert [h.worker_id for h in pool.live(Role.PREFILL)] == ["p-0"]
    assert pool.live(Role.DECODE) == []
    assert len(api.list_requests()) == 1  # one list, then only the watch
    assert len(api.watch_requests()) == 1


async def test_dropped_watch_resumes_from_the_last_resource_version(
        api: KubeApiStandIn, workers: dict[str, FakeWorker], pool: WorkerPool) -> None:
    api.apply(pod_of(workers["p-0"]))
    await pool.start()
    await until(lambda: len(api.watch_requests()) == 1, "the watch")
    api.apply(pod_of(workers["d-0"]))
    await until(lambda: live(pool) == {"p-0", "d-0"}, "d-0 added")
    seen = watcher(pool).resource_version
    assert seen == str(api.resource_version)

    api.drop_watches()  # the server ends the stream (its timeout, a restart, the network)
    api.apply(pod_of(workers["d-1"]))  # while no watch is open: kept in the history
    await until(lambda: len(api.watch_requests()) == 2, "the resumed watch")
    resumed = api.watch_requests()[1]
    assert resumed.params["resourceVersion"] == seen
    assert resumed.params["allowWatchBookmarks"].lower() == "true"
    await until(lambda: live(pool) == {"p-0", "d-0", "d-1"}, "d-1, added while disconnected")
    assert len(api.list_requests()) == 1  # resumed, not relisted
    assert watcher(pool).relists == 0


async def test_410_gone_forces_a_relist(
        api: KubeApiStandIn, workers: dict[str, FakeWorker], pool: WorkerPool) -> None:
    api.apply(pod_of(workers["p-0"]))
    api.apply(pod_of(workers["d-0"]))
    await pool.start()
    await until(lambda: len(api.watch_requests()) == 1, "the watch")
    stale = watcher(pool).resource_version
    metrics_registry = CollectorRegistry()
    RouterMetrics(metrics_registry).watch_fallbacks(**source_fallbacks(watcher(pool)))

    # Changes the watch never delivers, then the history compacted past the client's
    # resourceVersion: only a new list can tell it that d-0 went and d-1 came.
    api.drop_watches()
    api.pods.pop((NS, "d-0"))
    d1 = pod_of(workers["d-1"])
    d1["metadata"]["resourceVersion"] = str(api.resource_version + 1)  # type: ignore[index]
    api.pods[(NS, "d-1")] = d1
    api.resource_version += 1
    api.compact()

    await until(lambda: set(pool.workers) == {"p-0", "d-1"}, "the relisted set")
    await until(lambda: live(pool) == {"p-0", "d-1"}, "d-1 live")
    watches = api.watch_requests()
    assert watches[1].params["resourceVersion"] == stale  # answered 410 Gone
    assert len(api.list_requests()) == 2
    await until(lambda: len(api.watch_requests()) >= 3, "the watch after the relist")
    assert api.watch_requests()[2].params["resourceVersion"] == str(api.resource_version)
    assert watcher(pool).relists == 1
    assert metrics_registry.get_sample_value("tandem_router_discovery_relists_total") == 1


async def test_403_is_a_clear_error_and_the_last_workers_stay(
        api: KubeApiStandIn, workers: dict[str, FakeWorker], pool: WorkerPool,
        caplog: pytest.LogCaptureFixture) -> None:
    api.apply(pod_of(workers["p-0"]))
    api.apply(pod_of(workers["d-0"]))
    await pool.start()
    await until(lambda: len(api.watch_requests()) == 1, "the watch")
    metrics_registry = CollectorRegistry()
    RouterMetrics(metrics_registry).watch_fallbacks(**source_fallbacks(watcher(pool)))

    with caplog.at_level(logging.ERROR):
        api.forbidden = True  # the Role lost `watch` on pods
        api.drop_watches()
        await until(lambda: watcher(pool).forbidden >= 1, "a 403")
    problem = watcher(pool).problem
    assert "403 Forbidden" in problem
    assert "needs get, list and watch on pods" in problem
    assert f"in namespace {NS}" in problem
    assert "needs get, list and watch on pods" in caplog.text
    value = metrics_registry.get_sample_value
    assert value("tandem_router_discovery_forbidden_total") >= 1  # type: ignore[operator]
    assert value("tandem_router_discovery_errors_total") >= 1  # type: ignore[operator]
    await asyncio.sleep(0.2)  # a few refreshes and retries later
    assert live(pool) == {"p-0", "d-0"}  # routing goes on to the last known workers

    api.forbidden = False  # RBAC fixed: the watch resumes and is followed again
    await until(lambda: watcher(pool).problem == "", "recovery")
    api.delete("d-0")
    await until(lambda: live(pool) == {"p-0"}, "d-0 deleted after the recovery")


async def test_403_at_start_leaves_no_workers_and_says_why(
        api: KubeApiStandIn, workers: dict[str, FakeWorker], pool: WorkerPool) -> None:
    api.apply(pod_of(workers["p-0"]))
    api.forbidden = True
    await pool.start()  # starts anyway: the router serves, and says why it has no workers
    assert pool.workers == {}
    assert "403 Forbidden" in watcher(pool).problem
    api.forbidden = False
    await until(lambda: live(pool) == {"p-0"}, "p-0 once allowed")


async def test_a_pod_named_unlike_its_worker_is_not_routed_to(
        api: KubeApiStandIn, workers: dict[str, FakeWorker], pool: WorkerPool) -> None:
    misnamed = pod_of(workers["p-0"])
    misnamed["metadata"]["name"] = "tandem-prefill-7d9f"  # type: ignore[index]
    api.apply(misnamed)  # the worker calls itself p-0: its prefix-index stream says p-0
    await pool.start()
    assert set(pool.workers) == {"tandem-prefill-7d9f"}
    assert live(pool) == set()
    assert "its worker_id must match" in pool.config_errors()["tandem-prefill-7d9f"]


def test_config_fields_give_the_chart_s_variables(api: KubeApiStandIn) -> None:
    import argparse

    from router.config import router_flags

    flags = router_flags()
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    config = flags.build(parser.parse_args([]), environ={
        "TANDEM_MODEL": "/m", "TANDEM_REDIS_URL": "redis://r", "TANDEM_DISCOVERY": "kubernetes",
        "TANDEM_KUBERNETES_NAMESPACE": "serving",
        "TANDEM_KUBERNETES_LABEL_SELECTOR": "app.kubernetes.io/instance=t,tandem.ai/role"})
    assert config.discovery == "kubernetes"
    assert config.kubernetes == replace(
        KubernetesConfig(), kubernetes_namespace="serving",
        kubernetes_label_selector="app.kubernetes.io/instance=t,tandem.ai/role")
    with pytest.raises(ValueError, match="kubernetes_retry_s"):
        KubernetesConfig(kubernetes_retry_s=0)
    with pytest.raises(ValueError, match="discovery"):
        RouterConfig(model="/m", redis_url="redis://r", discovery="consul")  # type: ignore[arg-type]
