"""`tandem up`'s supervisor: a cluster process that exits is started again, as a process
supervisor or Kubernetes would, while the rest keep serving.

Each pass (`check`, every `interval_s` in `supervise`) looks at every process of the cluster
(workers and the router; Redis is the cluster's own, not supervised). One that exited is
reported and started again (`LocalCluster.respawn`: same name, ports and flags, so the router
finds a worker where it was and the prefill workers reconnect their transfer links to it) after
a backoff: `initial_backoff_s`, doubling with every exit in a row that came sooner than
`stable_after_s` after its start, capped at `max_backoff_s`. A process that keeps crashing fast
is therefore retried less and less often, and said so, never spun; one that ran for a while
starts again from the initial backoff. The supervisor does not wait for a restarted process to
be ready: a worker registers itself and the router's pool picks it up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `tandem --help` stays light: the launcher loads grpc
    from cli.local_cluster import LocalCluster, ServiceProcess


@dataclass(frozen=True)
class RestartPolicy:
    """How soon a process that exited is started again."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_after_s: float = 30.0  # an exit later than this after a start resets the backoff
    crash_loop_after: int = 3  # exits in a row, each sooner than stable_after_s: reported so

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0:
            raise ValueError(f"initial_backoff_s: must be > 0, got {self.initial_backoff_s}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"max_backoff_s: must be >= initial_backoff_s "
                             f"({self.initial_backoff_s}), got {self.max_backoff_s}")
        if self.stable_after_s < 0:
            raise ValueError(f"stable_after_s: must be >= 0, got {self.stable_after_s}")
        if self.crash_loop_after < 1:
            raise ValueError(f"crash_loop_after: must be >= 1, got {self.crash_loop_after}")

    def backoff_s(self, fast_exits: int) -> float:
        """The wait before the next start after `fast_exits` quick exits in a row (>= 1)."""
        return min(self.initial_backoff_s * 2 ** max(fast_exits - 1, 0), self.max_backoff_s)


@dataclass
class _Pending:
    """A process that exited, waiting for its backoff to end."""

    restart_at: float
    fast_exits: int  # exits in a row, each sooner than stable_after_s after its start


class Supervisor:
    """Restarts the cluster's processes that exit (see the module doc); `report` is told, in
    a line each, of every exit and restart."""

    def __init__(self, cluster: LocalCluster, policy: RestartPolicy | None = None,
                 report: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.policy = policy or RestartPolicy()
        self.report = report
        self._pending: dict[str, _Pending] = {}
        self._fast_exits: dict[str, int] = {}
        self.restarts = 0  # processes started again, in all

    def check(self, now: float | None = None) -> None:
        """One pass: schedules a restart for every process that exited, starts those whose
        backoff ended."""
        now = time.monotonic() if now is None else now
        for process in list(self.cluster.processes):
            pending = self._pending.get(process.name)
            if pending is None and not process.alive:
                self._exited(process, now)
            elif pending is not None and now >= pending.restart_at:
                del self._pending[process.name]
                self.cluster.respawn(process)
                self.restarts += 1
                self.report(f"restarted {process.name} (pid {process.popen.pid}, restart "
                            f"{process.restarts})")

    def _exited(self, process: ServiceProcess, now: float) -> None:
        ran = now - process.started_at
        fast = self._fast_exits.get(process.name, 0) + 1 \
            if ran < self.policy.stable_after_s else 1
        self._fast_exits[process.name] = fast
        delay = self.policy.backoff_s(fast)
        self._pending[process.name] = _Pending(now + delay, fast)
        line = (f"{process.name} exited with code {process.popen.returncode} after {ran:.1f} s;"
                f" restarting in {delay:.1f} s (log: {process.log_path})")
        if fast >= self.policy.crash_loop_after:
            line += (f" — crashing repeatedly: {fast} exits in a row within "
                     f"{self.policy.stable_after_s:.0f} s of starting, backing off")
        self.report(line)


def supervise(cluster: LocalCluster, stop: threading.Event,
              policy: RestartPolicy | None = None, report: Callable[[str], None] = print,
              interval_s: float = 0.5) -> Supervisor:
    """Restarts the processes of `cluster` that exit until `stop` is set (`tandem up`'s loop);
    returns the supervisor, with its count of restarts."""
    supervisor = Supervisor(cluster, policy, report)
    while not stop.wait(interval_s):
        supervisor.check()
    return supervisor
