"""A real local cluster (redis-server, prefill and decode workers, router) for e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.local_cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """2 prefill + 2 decode workers and the router, on the tiny Llama."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    with LocalCluster(tiny_llama, prefill=2, decode=2, log_dir=logs,
                      worker_args=["--num-blocks", "192"]) as running:
        yield running
