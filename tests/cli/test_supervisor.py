"""cli.supervisor: capped exponential backoff, reset by a stable run, and a process that keeps
crashing reported and backed off, never spun (tests/e2e/test_supervise.py restarts a killed
worker in a running cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli.local_cluster import LocalCluster, ServiceProcess
from cli.supervisor import RestartPolicy, Supervisor


def test_backoff_doubles_per_fast_exit_and_is_capped() -> None:
    policy = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=4.0)
    assert [policy.backoff_s(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize(("field", "value"), [("initial_backoff_s", 0.0),
                                              ("max_backoff_s", 0.1),
                                              ("stable_after_s", -1.0),
                                              ("crash_loop_after", 0)])
def test_bad_settings_are_refused_naming_the_field(field: str, value: float) -> None:
    settings: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=f"^{field}: "):
        RestartPolicy(**settings)


def crashing_process(tmp_path: Path) -> ServiceProcess:
    """A real process that exits with 3 at once, every time it is started (a worker with a
    refused flag does the same, only slower: tests/e2e/test_supervise.py restarts real ones)."""
    argv = [sys.executable, "-c", "import sys; print('refused: lease_ms'); sys.exit(3)"]
    log_path = tmp_path / "decode-1.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return ServiceProcess("decode", "decode-1", popen, log_path, "127.0.0.1:1", argv=argv,
                          env=dict(os.environ))


def test_a_process_that_keeps_crashing_is_reported_and_backed_off(tiny_llama: Path,
                                                                   tmp_path: Path) -> None:
    """A process that exits at once, driven through the supervisor's passes with explicit
    times: a fast exit doubles the wait, the second in a row is called a crash loop, nothing is
    started before its backoff ends, and an exit after a stable run starts the backoff again."""
    cluster = LocalCluster(tiny_llama, log_dir=tmp_path)
    process = crashing_process(tmp_path)
    cluster.processes.append(process)
    lines: list[str] = []
    supervisor = Supervisor(cluster, RestartPolicy(initial_backoff_s=1.0, max_backoff_s=8.0,
                                                   stable_after_s=60.0, crash_loop_after=2),
                            lines.append)

    def exit_and_restart(ran_s: float) -> float:
        """Lets the process exit, as if after `ran_s`; returns the backoff it got."""
        assert process.popen.wait(timeout=60) == 3
        restarts = process.restarts
        now = process.started_at + ran_s
        supervisor.check(now)
        assert lines[-1].startswith(f"{process.name} exited with code 3")
        wait = float(lines[-1].split("restarting in ")[1].split(" s")[0])
        supervisor.check(now + wait - 0.01)
        assert process.restarts == restarts  # not before the backoff ends
        supervisor.check(now + wait)
        assert process.restarts == restarts + 1
        assert lines[-1].startswith(f"restarted {process.name}")
        return wait

    assert exit_and_restart(0.5) == 1.0 and "crashing" not in lines[-2]
    assert exit_and_restart(0.5) == 2.0
    assert "crashing repeatedly: 2 exits in a row" in lines[-2]
    assert exit_and_restart(0.5) == 4.0
    assert exit_and_restart(0.5) == 8.0
    assert exit_and_restart(0.5) == 8.0  # capped
    assert exit_and_restart(61.0) == 1.0 and "crashing" not in lines[-2]  # a stable run
    process.popen.wait(timeout=60)
    assert process.log().count("refused: lease_ms") == 7  # every run, in one log
    assert supervisor.restarts == 6
