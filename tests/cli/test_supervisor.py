"""cli.supervisor: capped exponential backoff, reset by a stable run, and a process that keeps
crashing reported and backed off (tests/e2e/test_supervise.py restarts a killed worker in a
running cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cli.local_cluster import LocalCluster
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


def test_a_process_that_keeps_crashing_is_reported_and_backed_off(tiny_llama: Path,
                                                                   tmp_path: Path) -> None:
    """A real worker process that exits at once (a refused flag), driven through the
    supervisor's passes with explicit times: a fast exit doubles the wait, the second in a row
    is called a crash loop, nothing is started before its backoff ends, and an exit after a
    stable run starts the backoff again."""
    cluster = LocalCluster(tiny_llama, log_dir=tmp_path)
    process = cluster.spawn("decode", ["--lease-ms", "0"])
    lines: list[str] = []
    supervisor = Supervisor(cluster, RestartPolicy(initial_backoff_s=1.0, max_backoff_s=8.0,
                                                   stable_after_s=60.0, crash_loop_after=2),
                            lines.append)

    def exit_and_restart(ran_s: float) -> float:
        """Lets the process exit, as if after `ran_s`; returns the backoff it got."""
        assert process.popen.wait(timeout=60) != 0
        restarts = process.restarts
        now = process.started_at + ran_s
        supervisor.check(now)
        assert f"{process.name} exited with code" in lines[-1]
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
    assert exit_and_restart(61.0) == 1.0 and "crashing" not in lines[-2]  # a stable run
    cluster.kill(process)
    assert "lease_ms" in process.log()
    assert supervisor.restarts == 3
