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


def test_unique_ports_never_hand_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS may offer a port again before the process it went to has bound it."""
    offered = iter([5001, 5002, 5001, 5002, 5003])
    monkeypatch.setattr("cli.local_cluster.free_port", lambda: next(offered))
    ports = UniquePorts()
    assert [ports.take(), ports.take(), ports.take()] == [5001, 5002, 5003]
