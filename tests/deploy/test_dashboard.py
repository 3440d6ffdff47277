"""deploy/grafana/tandem-dashboard.json: fresh from its generator, well formed, and every PromQL
expression valid and returning data on a real Prometheus that scrapes a (fake) cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from observability.dashboard import (
    DEFAULT_VARIABLES,
    TTFT_SLO_OPTIONS,
    dashboard_exprs,
    render,
)
from tests.deploy.conftest import DASHBOARD, REPO
from tests.deploy.fakes import FakeCluster
from tests.support.prometheus_server import LocalPrometheus, PromQLError

ROWS = ["Service level", "Router", "Prefill", "Decode", "KV transfer", "Fallbacks"]
# What the issue asks the dashboard to show, by the metric that shows it.
REQUIRED_METRICS = [
    "tandem_time_to_first_token_seconds_bucket", "tandem_inter_token_latency_seconds_bucket",
    "tandem_generation_tokens_total", "tandem_requests_total",
    "tandem_router_decisions_total", "tandem_router_prefix_hit_blocks_total",
    "tandem_router_degraded", "tandem_router_queue_depth", "tandem_router_retries_total",
    "tandem_prompt_tokens_computed_total", "tandem_prefix_cache_hit_tokens_total",
    "tandem_prefill_batch_tokens_bucket", "tandem_step_duration_seconds_bucket",
    "tandem_num_requests_running", "tandem_decode_batch_size_bucket",
    "tandem_kv_cache_usage_ratio", "tandem_lease_expiries_total",
    "tandem_local_prefill_fallbacks_total", "tandem_kv_transfer_bytes_total",
    "tandem_kv_transfer_latency_seconds_bucket", "tandem_kv_transfer_failures_total",
    # every fallback (issue #9, bug 7)
    "tandem_registry_heartbeat_failures_total", "tandem_prefix_index_publish_failures_total",
    "tandem_prefix_index_republishes_total", "tandem_router_prefix_tail_reloads_total",
    "tandem_router_prefix_tail_sync_failures_total",
    "tandem_router_registry_list_failures_total", "tandem_router_index_mode_transitions_total",
    "tandem_prefill_transfer_failures_total", "tandem_prefill_connect_failures_total",
    "tandem_router_retries_total", "tandem_decode_kv_arrivals_total",
    "tandem_router_migrations_total"]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_dashboard_is_fresh() -> None:
    assert DASHBOARD.read_text() == render(), "stale: run python3 scripts/gen_dashboard.py"


def test_generator_check_flags_a_stale_file(tmp_path: Path) -> None:
    script = [sys.executable, str(REPO / "scripts" / "gen_dashboard.py")]
    fresh = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    stale = tmp_path / "dashboard.json"
    stale.write_text(render().replace("Time to first token", "TTFT"))
    result = subprocess.run([*script, "--check", "--out", str(stale)], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "stale" in result.stderr


def test_dashboard_structure() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                   for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_the_issue() -> None:
    exprs = " ".join(e for _, e in dashboard_exprs(dashboard()))
    missing = [m for m in REQUIRED_METRICS if m not in exprs]
    assert not missing
    assert exprs.count("histogram_quantile(0.99") >= 5


def test_goodput_slo_choices_are_ttft_buckets(fake_cluster: FakeCluster) -> None:
    router = fake_cluster.expositions()["router"]
    bounds = set(re.findall(r'tandem_time_to_first_token_seconds_bucket\{le="([^"]+)"', router))
    assert set(TTFT_SLO_OPTIONS) <= bounds and DEFAULT_VARIABLES["ttft_slo"] in bounds


def test_dashboard_metrics_are_exported() -> None:
    cluster = FakeCluster()
    cluster.traffic()
    exported = cluster.sample_names()
    for title, expr in dashboard_exprs(dashboard()):
        for name in re.findall(r"\btandem_\w+", expr):
            assert name in exported, f"{title}: {name} is not exported"


def test_invalid_and_empty_expressions_are_told_apart(prometheus: LocalPrometheus) -> None:
    """What the next test relies on: bad PromQL raises, an unknown series returns nothing."""
    with pytest.raises(PromQLError) as error:
        prometheus.query("sum(rate(tandem_requests_total))")
    assert error.value.error_type == "bad_data"
    assert prometheus.query("rate(tandem_no_such_metric_total[1m])")["result"] == []
    assert prometheus.query("tandem_router_degraded")["result"]


def test_every_expression_is_valid_and_returns_data(prometheus: LocalPrometheus) -> None:
    empty, invalid = [], []
    for title, expr in dashboard_exprs(dashboard()):
        try:
            result = prometheus.query(expr)["result"]
        except PromQLError as error:
            invalid.append(f"{title}: {error}")
            continue
        if not result:
            empty.append(f"{title}: {expr}")
    assert not invalid, "\n".join(invalid)
    assert not empty, "no data:\n" + "\n".join(empty)
