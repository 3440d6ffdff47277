"""The chaos soak, bounded to a minute: workers killed and replaced and Redis restarted under
steady load, and every request ends with the right tokens or a clear status, no block leaks,
no process grows past the RSS bound (tests/support/soak.py; the longer run is documented
there and in docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.chaos import ACTIONS
from tests.support.soak import SoakConfig, soak, soak_cluster

pytestmark = pytest.mark.timeout(600)


async def test_a_one_minute_chaos_soak_keeps_every_contract(tiny_llama: Path,
                                                            tmp_path: Path) -> None:
    config = SoakConfig(minutes=1.0, chaos_interval_s=5.0)
    with soak_cluster(tiny_llama, config, tmp_path) as cluster:
        report = await soak(cluster, tiny_llama, config)
    print(report.summary())
    assert report.ok, report.summary()
    assert set(report.actions) == set(ACTIONS), report.actions  # each kind of fault happened
    assert report.completed > 0 and not report.leaked
    assert report.requests == report.completed + sum(report.failed.values())
