"""A benchmark subprocess that uses the CPU only in its turn: SIGSTOP'd between its turns.

An engine in a subprocess (vLLM: its front process, its EngineCore child, their OpenMP threads)
can keep computing, polling or spinning while the bench runs another engine, which then gets
less than the machine. `PausedGroup` starts the subprocess in a process group of its own, and
`stop()`s the whole group (every live descendant too) between turns; `turn()` resumes it for
one run.

No stopped process is left behind:
- `close()` resumes the group before ending it, and `kill()` ends it stopped or not;
- the group is new but in the bench's session, so if the bench dies without cleaning up (even
  SIGKILL), the group becomes orphaned while stopped and the kernel sends it SIGHUP then SIGCONT
  (POSIX), which ends it; a new session would not get that;
- a Ctrl-C at the terminal goes to the bench's foreground group only, so the subprocess is not
  interrupted mid-run: the bench's `finally` closes it.

A new session would also be unfair: with the kernel's autogroup scheduling (on in this VM:
/proc/sys/kernel/sched_autogroup_enabled), each session is a scheduling group with an equal
share of a contended machine, so a subprocess in a session of its own would get as much CPU as
the bench and everything else in the bench's session together.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psutil

from engine.bench.cpu_time import tree

HALTED = {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE,
          psutil.STATUS_DEAD}


class PausedGroup:
    """`subprocess.Popen(args, **popen)` in a new process group, stopped between `turn()`s.

    It runs freely from the start (start-up is not disturbed) until the first `stop()`.
    """

    def __init__(self, args: list[str], **popen: Any) -> None:
        self.proc: subprocess.Popen[str] = subprocess.Popen(args, process_group=0, **popen)
        self.pgid = self.proc.pid
        self.stopped = False

    def _signal(self, sig: signal.Signals) -> None:
        """`sig` to the group, and to any descendant that moved to another group."""
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:  # the group has ended
            return
        for proc in tree(self.proc.pid):
            try:
                if os.getpgid(proc.pid) != self.pgid:
                    proc.send_signal(sig)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """SIGSTOP the group and wait until every live process of its tree is stopped."""
        self._signal(signal.SIGSTOP)
        self.stopped = True
        deadline = time.monotonic() + timeout
        while True:
            running = []
            for proc in tree(self.proc.pid):
                try:
                    if proc.status() not in HALTED:
                        running.append(f"{proc.pid} ({proc.status()})")
                except psutil.NoSuchProcess:
                    pass
            if not running:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {', '.join(running)} did not stop "
                                   f"within {timeout} s of SIGSTOP")
            time.sleep(0.005)

    def resume(self) -> None:
        """SIGCONT the group (harmless when it runs)."""
        self._signal(signal.SIGCONT)
        self.stopped = False

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Resumed for the body, stopped after it; left running if the body raises, so that
        whoever handles the error can close it normally."""
        self.resume()
        yield
        self.stop()

    def kill(self) -> None:
        """SIGKILL the whole group (stopped processes die too) and reap the leader."""
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def close(self, timeout: float) -> None:
        """Resume the group, wait up to `timeout` s for the leader to exit (the caller has told
        it to, e.g. by closing its stdin), then kill what is left of the group."""
        self.resume()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill()
