"""`observability.metrics`: names, labels and values of the exposition, and
`promtool check metrics`.

The workers' series come from the real stats dataclasses (filled by hand); the router's from
its event methods. Each process's text is parsed back with prometheus_client's parser and
linted by the real `promtool`.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from observability.metrics import (
    ITL_BUCKETS_S,
    OUTCOMES,
    ROUTER_FALLBACKS,
    TAIL_RESYNC_REASONS,
    TRANSFER_FAILURE_REASONS,
    TRANSFER_FAILURE_WHERE,
    TTFT_BUCKETS_S,
    RouterMetrics,
    serve_metrics,
    start_metrics_server,
)
from observability.metrics_worker import IndexCounts, KVBlockCounts, WorkerMetrics, WorkerSources
from tests.deploy.fakes import FakeCluster
from tests.support.prometheus_server import promtool

Key = tuple[str, tuple[tuple[str, str], ...]]


def samples(registry: CollectorRegistry) -> dict[Key, float]:
    """{(sample name, sorted labels): value} of the registry's text exposition."""
    text = generate_latest(registry).decode()
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert isinstance(s, Sample)
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = samples(registry)
    key = (name, tuple(sorted(labels.items())))
    assert key in found, f"{name}{labels} not exported; have " + ", ".join(
        sorted({n for n, _ in found}))
    return found[key]


@pytest.fixture
def fake() -> FakeCluster:
    cluster = FakeCluster()
    cluster.traffic(requests=4)
    return cluster


# ---- the router ------------------------------------------------------------------------------

def test_router_request_metrics(fake: FakeCluster) -> None:
    r = fake.router_registry
    assert value(r, "tandem_requests_received_total") == 5
    assert value(r, "tandem_requests_total", outcome="length") == 4
    assert value(r, "tandem_requests_total", outcome="INVALID_ARGUMENT") == 1
    assert value(r, "tandem_requests_total", outcome="UNAVAILABLE") == 0  # pre-initialized
    assert value(r, "tandem_time_to_first_token_seconds_count") == 4
    assert value(r, "tandem_time_to_first_token_seconds_sum") == pytest.approx(0.3 + 0.4 + 0.5
                                                                              + 0.6)
    assert value(r, "tandem_time_to_first_token_seconds_bucket", le="0.5") == 3
    assert value(r, "tandem_inter_token_latency_seconds_count") == 28
    # the error ended before any token: not a latency sample; TPOT = (e2e - ttft) / (8 - 1)
    assert value(r, "tandem_e2e_request_latency_seconds_count") == 4
    assert value(r, "tandem_time_per_output_token_seconds_sum") == pytest.approx(4 * 0.3 / 7)
    assert value(r, "tandem_prompt_tokens_total") == 160
    assert value(r, "tandem_generation_tokens_total") == 32
    assert value(r, "tandem_prompt_tokens_cached_total") == 64
    assert value(r, "tandem_router_queue_time_seconds_count") == 4
    assert value(r, "tandem_router_decisions_total", policy="kv_aware", mode="exact") == 4
    assert value(r, "tandem_router_prefix_hit_blocks_total") == 4
    assert value(r, "tandem_router_prefix_query_blocks_total") == 12
    assert value(r, "tandem_router_retries_total", reason="kv_transfer") == 1
    assert value(r, "tandem_router_retries_total", reason="prefill") == 0
    assert value(r, "tandem_router_live_workers", role="decode") == 1


def test_unknown_outcome_is_bounded() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    metrics.request_finished("something odd", 1.0)
    assert value(registry, "tandem_requests_total", outcome="UNKNOWN") == 1
    names = {dict(labels).get("outcome") for (n, labels) in samples(registry)
             if n == "tandem_requests_total"}
    assert names == set(OUTCOMES)


def test_index_mode_gauges_set_and_watched() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    assert value(registry, "tandem_router_degraded") == 0
    assert value(registry, "tandem_router_index_mode", mode="exact") == 1
    metrics.set_index_mode("degraded")
    assert value(registry, "tandem_router_degraded") == 1
    assert value(registry, "tandem_router_index_mode", mode="exact") == 0
    assert value(registry, "tandem_router_index_mode", mode="degraded") == 1
    with pytest.raises(ValueError, match="mode"):
        metrics.set_index_mode("approximate")

    state: dict[str, float] = {"queued": 3, "inflight": 7}
    mode = ["exact"]
    metrics.watch(queue_depth=lambda: state["queued"], inflight=lambda: state["inflight"],
                  index_mode=lambda: mode[0],
                  live_workers=lambda: {"prefill": 2})
    assert value(registry, "tandem_router_degraded") == 0
    assert value(registry, "tandem_router_queue_depth") == 3
    state["queued"], mode[0] = 5, "degraded"
    assert value(registry, "tandem_router_degraded") == 1
    assert value(registry, "tandem_router_queue_depth") == 5
    assert value(registry, "tandem_router_inflight_requests") == 7
    assert value(registry, "tandem_router_live_workers", role="prefill") == 2
    assert value(registry, "tandem_router_live_workers", role="decode") == 0


def test_router_fallback_counters_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    names = [name for name, _ in ROUTER_FALLBACKS.values()]
    assert [value(registry, f"{n}_total") for n in names] == [0] * len(names)  # unwired
    counts = {"reloads": 2, "syncs": 0, "listings": 5}
    metrics.watch_fallbacks(prefix_tail_reloads=lambda: counts["reloads"],
                            prefix_tail_sync_failures=lambda: counts["syncs"],
                            registry_list_failures=lambda: counts["listings"])
    counts["syncs"] = 3
    assert value(registry, "tandem_router_prefix_tail_reloads_total") == 2
    assert value(registry, "tandem_router_prefix_tail_sync_failures_total") == 3
    assert value(registry, "tandem_router_registry_list_failures_total") == 5
    assert value(registry, "tandem_router_index_mode_transitions_total") == 0  # not watched
    family = next(f for f in text_string_to_metric_families(generate_latest(registry).decode())
                  if f.name == "tandem_router_registry_list_failures")
    assert family.type == "counter"


def test_router_resyncs_and_stale_routes_are_exported() -> None:
    from index.prefix_tail import RESYNC_REASONS

    assert RESYNC_REASONS == TAIL_RESYNC_REASONS
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    assert value(registry, "tandem_router_prefix_tail_resyncs_total", reason="gap") == 0
    counts = {"gap": 2, "restart": 1}
    metrics.watch_resyncs(lambda: counts)
    counts["gap"] = 3
    assert value(registry, "tandem_router_prefix_tail_resyncs_total", reason="gap") == 3
    assert value(registry, "tandem_router_prefix_tail_resyncs_total", reason="restart") == 1
    assert value(registry, "tandem_router_prefix_tail_resyncs_total", reason="epoch") == 0
    assert value(registry, "tandem_router_stale_index_routes_total", role="decode") == 0
    metrics.stale_index_route("decode")
    assert value(registry, "tandem_router_stale_index_routes_total", role="decode") == 1
    assert value(registry, "tandem_router_stale_index_routes_total", role="prefill") == 0


def test_histogram_buckets_span_cpu_and_gpu_speeds() -> None:
    assert TTFT_BUCKETS_S[0] <= 0.001 and TTFT_BUCKETS_S[-1] >= 60
    assert ITL_BUCKETS_S[0] <= 0.0005 and ITL_BUCKETS_S[-1] >= 5
    assert list(TTFT_BUCKETS_S) == sorted(set(TTFT_BUCKETS_S))


# ---- the workers -----------------------------------------------------------------------------

def test_worker_series_carry_worker_and_role(fake: FakeCluster) -> None:
    for worker in (fake.prefill, fake.decode):
        for name, labels in samples(worker.registry):
            if name.startswith("tandem_"):
                assert ("worker", worker.worker_id) in labels, name
                assert ("role", worker.role) in labels, name


def test_worker_counters_and_gauges_from_stats(fake: FakeCluster) -> None:
    p = fake.prefill.registry
    d = fake.decode.registry
    pl = {"worker": "prefill-1", "role": "prefill"}
    dl = {"worker": "decode-1", "role": "decode"}
    assert value(p, "tandem_prompt_tokens_computed_total", **pl) == 96
    assert value(p, "tandem_prefix_cache_query_tokens_total", **pl) == 160
    assert value(p, "tandem_prefix_cache_hit_tokens_total", **pl) == 64
    assert value(p, "tandem_prefill_requests_total", **pl) == 4
    assert value(p, "tandem_prefill_blocks_sent_total", **pl) == 12
    assert value(p, "tandem_num_requests_waiting", **pl) == 1
    assert value(d, "tandem_decode_tokens_computed_total", **dl) == 28
    assert value(d, "tandem_engine_generated_tokens_total", **dl) == 28
    assert value(d, "tandem_kv_blocks_used", **dl) == 12
    assert value(d, "tandem_kv_blocks_free", **dl) == 52
    assert value(d, "tandem_kv_blocks_capacity", **dl) == 64
    assert value(d, "tandem_kv_cache_usage_ratio", **dl) == pytest.approx(12 / 64)
    assert value(d, "tandem_num_requests_running", **dl) == 2
    assert value(d, "tandem_decode_reservations_total", **dl) == 4
    assert value(d, "tandem_decode_kv_arrivals_total", result="completed", **dl) == 4
    assert value(d, "tandem_decode_kv_arrivals_total", result="failed", **dl) == 0
    assert value(d, "tandem_local_prefill_fallbacks_total", **dl) == 1
    assert value(d, "tandem_lease_expiries_total", **dl) == 0
    # role-specific counters stay on their role
    assert "tandem_prefill_requests_total" not in {n for n, _ in samples(d)}
    assert "tandem_lease_expiries_total" not in {n for n, _ in samples(p)}


def test_worker_fallback_counters(fake: FakeCluster) -> None:
    p, d = fake.prefill, fake.decode
    pl = {"worker": "prefill-1", "role": "prefill"}
    dl = {"worker": "decode-1", "role": "decode"}
    assert value(p.registry, "tandem_prefix_index_republishes_total", **pl) == 1  # the start
    assert value(p.registry, "tandem_registry_heartbeat_failures_total", **pl) == 0
    d.index = IndexCounts(heartbeat_failures=4, publish_failures=2, republishes=3)
    assert value(d.registry, "tandem_registry_heartbeat_failures_total", **dl) == 4
    assert value(d.registry, "tandem_prefix_index_publish_failures_total", **dl) == 2
    assert value(d.registry, "tandem_prefix_index_republishes_total", **dl) == 3
    p.prefill.connect_failures += 2
    p.prefill.transfer_failures += 1
    assert value(p.registry, "tandem_prefill_connect_failures_total", **pl) == 2
    assert value(p.registry, "tandem_prefill_transfer_failures_total", **pl) == 1


def test_step_histograms(fake: FakeCluster) -> None:
    p, d = fake.prefill.registry, fake.decode.registry
    pl = {"worker": "prefill-1", "role": "prefill"}
    dl = {"worker": "decode-1", "role": "decode"}
    assert value(p, "tandem_step_duration_seconds_count", **pl) == 4
    assert value(p, "tandem_prefill_batch_tokens_count", **pl) == 4
    assert value(p, "tandem_prefill_batch_tokens_bucket", le="32.0", **pl) == 4
    assert value(p, "tandem_prefill_batch_tokens_bucket", le="16.0", **pl) == 0
    assert value(p, "tandem_decode_batch_size_count", **pl) == 0  # no decode seqs on prefill
    assert value(d, "tandem_step_duration_seconds_count", **dl) == 28
    assert value(d, "tandem_decode_batch_size_bucket", le="2.0", **dl) == 28
    assert value(d, "tandem_step_batch_size_sum", **dl) == 56
    assert value(d, "tandem_prefill_batch_tokens_count", **dl) == 0


def test_transfer_stats_become_cumulative_histograms_and_failures(fake: FakeCluster) -> None:
    p = fake.prefill.registry
    pl = {"worker": "prefill-1", "role": "prefill"}
    assert value(p, "tandem_kv_transfer_bytes_total", direction="sent", **pl) == 4 * 3 * 4096
    assert value(p, "tandem_kv_transfer_bytes_total", direction="received", **pl) == 0
    assert value(p, "tandem_kv_transfer_writes_total", **pl) == 4
    # 4 writes of 4 ms: none at or below 2.5 ms, all from the 5 ms bound on, cumulatively
    lat = {"op": "write", **pl}
    assert value(p, "tandem_kv_transfer_latency_seconds_bucket", le="0.0025", **lat) == 0
    assert value(p, "tandem_kv_transfer_latency_seconds_bucket", le="0.005", **lat) == 4
    assert value(p, "tandem_kv_transfer_latency_seconds_bucket", le="10.0", **lat) == 4
    assert value(p, "tandem_kv_transfer_latency_seconds_bucket", le="+Inf", **lat) == 4
    assert value(p, "tandem_kv_transfer_latency_seconds_count", **lat) == 4
    assert value(p, "tandem_kv_transfer_latency_seconds_sum", **lat) == pytest.approx(0.016)
    failures = {(dict(lb)["where"], dict(lb)["reason"]): v for (n, lb), v in samples(p).items()
                if n == "tandem_kv_transfer_failures_total"}
    assert failures[("write", "timeout")] == 1
    assert len(failures) == len(TRANSFER_FAILURE_WHERE) * len(TRANSFER_FAILURE_REASONS)
    assert sum(failures.values()) == 1


def test_transfer_histogram_overflow_lands_in_inf_only() -> None:
    worker = FakeCluster().decode
    worker.transfer.record_request(1, 99.0)  # above every bound
    lat = {"op": "request", "worker": "decode-1", "role": "decode"}
    assert value(worker.registry, "tandem_kv_transfer_latency_seconds_bucket", le="10.0",
                 **lat) == 0
    assert value(worker.registry, "tandem_kv_transfer_latency_seconds_bucket", le="+Inf",
                 **lat) == 1


def test_failure_reasons_match_kv_transfer() -> None:
    from kv_transfer.base import FailureReason

    assert set(TRANSFER_FAILURE_REASONS) == {r.value for r in FailureReason}


def test_sources_from_engine_read_blocks_and_scheduler() -> None:
    @dataclass
    class StubEngine:  # the parts of `Engine` the sources read, without a model
        stats: object
        block_manager: BlockManager
        scheduler: Scheduler
        num_blocks: int

    from engine.engine import EngineStats

    bm = BlockManager(num_blocks=10, block_size=4)
    engine = StubEngine(EngineStats(steps=3), bm, Scheduler(bm, 4, 64), 10)
    assert bm.allocate("r1", list(range(10)), []) is not None  # 3 blocks
    registry = CollectorRegistry()
    WorkerMetrics(registry, "decode", "d", WorkerSources.from_engine(engine))  # type: ignore[arg-type]
    labels = {"worker": "d", "role": "decode"}
    assert value(registry, "tandem_kv_blocks_used", **labels) == 3
    assert value(registry, "tandem_kv_blocks_free", **labels) == 7
    assert value(registry, "tandem_kv_cache_usage_ratio", **labels) == pytest.approx(0.3)
    assert value(registry, "tandem_engine_steps_total", **labels) == 3
    assert value(registry, "tandem_num_requests_running", **labels) == 0


def test_a_broken_source_leaves_out_only_its_series() -> None:
    def broken() -> KVBlockCounts:
        raise RuntimeError("engine gone")

    registry = CollectorRegistry()
    fake = FakeCluster().decode
    WorkerMetrics(registry, "decode", "d", WorkerSources(blocks=broken,
                                                         decode_stats=lambda: fake.decode))
    names = {n for n, _ in samples(registry)}
    assert "tandem_lease_expiries_total" in names
    assert "tandem_kv_blocks_used" not in names


def test_registries_are_independent() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    RouterMetrics(a).request_started()
    RouterMetrics(b)
    assert value(a, "tandem_requests_received_total") == 1
    assert value(b, "tandem_requests_received_total") == 0
    with pytest.raises(ValueError, match="role"):
        WorkerMetrics(CollectorRegistry(), "router", "x")


# ---- exposition ------------------------------------------------------------------------------

def test_every_process_passes_promtool_check_metrics(fake: FakeCluster) -> None:
    for name, text in fake.expositions().items():
        result = promtool("check", "metrics", stdin=text)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            f"{name}: promtool check metrics:\n{result.stdout}{result.stderr}")


def test_promtool_check_metrics_catches_a_bad_name() -> None:
    """The check above can fail: a counter without `_total` and a unit abbreviation fail."""
    bad = "# HELP tandem_x_ms x\n# TYPE tandem_x_ms counter\ntandem_x_ms 1\n"
    result = promtool("check", "metrics", stdin=bad)
    assert result.returncode != 0 and "_total" in result.stdout + result.stderr


def test_metrics_server_serves_the_registry() -> None:
    registry = CollectorRegistry()
    RouterMetrics(registry).request_started()
    server = serve_metrics(registry, "127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert "tandem_requests_received_total 1.0" in text
    finally:
        server.close()
    port = start_metrics_server(registry)  # daemon thread for the process's life
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert b"tandem_time_to_first_token_seconds_bucket" in reply.read()


def test_metrics_modules_stay_free_of_torch() -> None:
    """The router imports them and must not import torch."""
    import subprocess
    import sys

    code = ("import sys, observability.metrics, observability.metrics_worker, "
            "observability.dashboard; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
