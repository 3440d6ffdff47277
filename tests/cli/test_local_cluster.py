"""LocalCluster's thread policy for workers sharing one machine's cores (the processes
themselves are exercised by tests/e2e and tests/prefill_worker/test_bench.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.local_cluster import LocalCluster, UniquePorts


def test_prefill_takes_every_core_and_decode_its_share(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cluster = LocalCluster(tmp_path, prefill=1, decode=1, log_dir=tmp_path)
    assert cluster.threads("prefill") is None  # torch's default: every core
    assert cluster.threads("decode") == 4
    assert LocalCluster(tmp_path, prefill=2, decode=2, log_dir=tmp_path).threads("decode") == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert LocalCluster(tmp_path, prefill=2, decode=2, log_dir=tmp_path).threads("decode") == 1
    pinned = LocalCluster(tmp_path, prefill_threads=1, decode_threads=3, log_dir=tmp_path)
    assert (pinned.threads("prefill"), pinned.threads("decode")) == (1, 3)


def test_unique_ports_never_twice_never_busy_never_ephemeral(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A port handed out is not handed out again, one in use is skipped, and all lie below the
    OS's ephemeral range (where another process's connection could take them first)."""
    monkeypatch.setattr("cli.local_cluster.port_is_free", lambda port: port != 20_002)
    ports = UniquePorts(low=20_000, high=20_004)
    ports.next = 20_001
    assert [ports.take(), ports.take(), ports.take()] == [20_001, 20_003, 20_000]
    with pytest.raises(RuntimeError, match="no free port"):
        ports.take()
    real = UniquePorts()
    taken = {real.take() for _ in range(50)}
    assert len(taken) == 50 and all(20_000 <= p < 32_768 for p in taken)
