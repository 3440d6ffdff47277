"""A real Prometheus scraping a fake cluster's `/metrics` (router + two workers, no model).

Session-scoped: Prometheus takes ~6 s to its first scrape here. Traffic is recorded twice
after the first scrape, a few scrapes apart, so `rate()` over the dashboard's window sees
increases, as it would on a running cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.fakes import FakeCluster
from tests.support.prometheus_server import LocalPrometheus

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "tandem-dashboard.json"


@pytest.fixture(scope="session")
def fake_cluster() -> Iterator[FakeCluster]:
    cluster = FakeCluster()
    cluster.serve()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def prometheus(fake_cluster: FakeCluster) -> Iterator[LocalPrometheus]:
    """Scrapes the fake cluster every second, with the alert rules loaded; traffic recorded."""
    with LocalPrometheus([s.address for s in fake_cluster.servers],
                         rule_files=[ALERTS]) as prom:
        prom.wait_for_scrape(timeout_s=30)
        fake_cluster.traffic(requests=4)
        time.sleep(2.5)
        fake_cluster.traffic(requests=4)
        prom.wait_for_scrape(scrapes=3)
        yield prom
