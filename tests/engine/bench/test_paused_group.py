"""`PausedGroup` on real processes: a stopped tree uses no CPU, it resumes, an error leaves it
running for its closer, and neither `kill()` nor the bench's own death leaves a stopped process
behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from engine.bench.cpu_time import tree, tree_cpu_seconds
from engine.bench.paused_group import PausedGroup

ROOT = Path(__file__).resolve().parents[3]
BUSY = [sys.executable, "-m", "tests.support.busy_tree"]


def wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def statuses(group: PausedGroup) -> list[str]:
    return [p.status() for p in tree(group.proc.pid)]


@pytest.fixture
def busy() -> Iterator[tuple[PausedGroup, int]]:
    """A spinning process and its spinning child, in a group of their own."""
    group = PausedGroup(BUSY, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert group.proc.stdout is not None
    child = int(group.proc.stdout.readline().split()[1])
    try:
        yield group, child
    finally:
        group.kill()


def test_a_stopped_tree_uses_no_cpu_and_resumes(busy: tuple[PausedGroup, int]) -> None:
    group, child = busy
    assert [p.pid for p in tree(group.proc.pid)] == [group.proc.pid, child]
    assert os.getpgid(child) == group.pgid != os.getpgid(0)
    group.stop()
    assert statuses(group) == [psutil.STATUS_STOPPED] * 2
    stopped = tree_cpu_seconds(group.proc.pid)
    time.sleep(0.3)
    assert tree_cpu_seconds(group.proc.pid) == stopped
    group.resume()
    assert psutil.STATUS_STOPPED not in statuses(group)
    wait_for(lambda: tree_cpu_seconds(group.proc.pid) > stopped, "the resumed tree computes")


def test_turn_runs_the_body_resumed_then_stops(busy: tuple[PausedGroup, int]) -> None:
    group, _ = busy
    group.stop()
    with group.turn():
        assert psutil.STATUS_STOPPED not in statuses(group)
    assert statuses(group) == [psutil.STATUS_STOPPED] * 2
    with pytest.raises(RuntimeError, match="mid-run"), group.turn():
        raise RuntimeError("mid-run")
    assert psutil.STATUS_STOPPED not in statuses(group)  # left running for close()


def test_kill_and_close_end_a_stopped_tree(busy: tuple[PausedGroup, int]) -> None:
    group, child = busy
    group.stop()
    group.close(0.1)  # does not exit by itself: killed after the wait
    assert group.proc.returncode == -signal.SIGKILL
    wait_for(lambda: gone(child), "the stopped child is killed too")


PARENT = """
import subprocess, sys, time
from engine.bench.paused_group import PausedGroup
group = PausedGroup([sys.executable, "-m", "tests.support.busy_tree"], stdout=subprocess.PIPE,
                    text=True)
child = group.proc.stdout.readline().split()[1]
group.stop()
print(group.proc.pid, child, flush=True)
time.sleep(600)
"""


def test_a_bench_killed_outright_leaves_no_stopped_process() -> None:
    """SIGKILL gives the bench no chance to clean up: the kernel ends the orphaned group."""
    bench = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bench.stdout is not None
    pids = [int(p) for p in bench.stdout.readline().split()]
    try:
        assert len(pids) == 2
        wait_for(lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in pids),
                 "both stopped")
        bench.kill()
        bench.wait()
        for pid in pids:
            wait_for(lambda pid=pid: gone(pid), f"stopped process {pid} ends with its bench")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
