"""The transfer-failure tests of tests/e2e/test_failures.py again, with every worker on the
ucxx transfer backend (`--transfer-backend ucxx`) instead of NIXL: a cancel while KV is in
flight, prefill workers stalled past the peer timeout and woken, a prefill worker killed
mid-transfer, a decode worker killed mid-stream (its requests migrate). The tests are the
same functions, collected here again; this module's `slow_cluster` fixture overrides theirs.
The failures that do not involve a transfer (Redis, queue reports, layout refusals, SIGTERM)
run on NIXL only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.local_cluster import LocalCluster
from tests.e2e.test_failures import (
    SLOW_WORKER_ARGS,
    test_cancel_during_prefill_frees_blocks_on_both_sides,
    test_decode_worker_killed_its_requests_migrate,
    test_prefill_worker_killed_requests_are_retried,
    test_stalled_prefill_workers_reconnect_after_sigcont,
)

__all__ = ["test_cancel_during_prefill_frees_blocks_on_both_sides",
           "test_decode_worker_killed_its_requests_migrate",
           "test_prefill_worker_killed_requests_are_retried",
           "test_stalled_prefill_workers_reconnect_after_sigcont"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def slow_cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("slow-ucxx-cluster-logs")
    with LocalCluster(tiny_llama, prefill=2, decode=2, log_dir=logs,
                      worker_args=[*SLOW_WORKER_ARGS, "--transfer-backend", "ucxx"]) as running:
        yield running


def test_the_workers_transfer_over_ucxx_not_nixl(slow_cluster: LocalCluster) -> None:
    """The flag reached every worker: each maps libucxx and no NIXL library (both backends
    load their libraries only when chosen)."""
    for worker in slow_cluster.workers("prefill") + slow_cluster.workers("decode"):
        maps = Path(f"/proc/{worker.popen.pid}/maps").read_text()
        assert "libucxx" in maps and "nixl" not in maps, worker.name
