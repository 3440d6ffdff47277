"""The chaos half of the soak (tests/support/soak.py): kills and restarts a `LocalCluster`'s
workers and its Redis, and samples every process's resident memory.

Every action takes a process down and brings a replacement up before the next: a worker is
killed with SIGKILL (no goodbye: its registry entry lapses, its streams break) and a new one of
the same role is spawned and waited for; Redis is killed and started empty on the same port
(the workers re-register, the prefix index starts over). Actions come in shuffled rounds of
all three kinds, so even a short soak has each. Restarts come from here, not from a
supervisor, so the soak does not depend on `tandem up` restarting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from cli.local_cluster import LocalCluster, ServiceProcess

log = logging.getLogger(__name__)

ACTIONS = ("kill_prefill", "kill_decode", "restart_redis")


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Chaos:
    """Runs actions on `cluster` every `interval_s` (± half) until `stop` is set."""

    cluster: LocalCluster
    interval_s: float
    rng: random.Random
    min_alive: int = 1  # a role keeps at least this many live workers while one is replaced
    actions: Counter[str] = field(default_factory=Counter)  # done, by kind
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # process name → peak
    errors: list[str] = field(default_factory=list)  # actions that failed (a replacement that
    # never became ready, a Redis that did not start): the soak reports them as violations

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for action in self.rng.sample(ACTIONS, len(ACTIONS)):
                delay = self.interval_s * self.rng.uniform(0.5, 1.5)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                    return
                except TimeoutError:
                    pass
                try:
                    await self.act(action)
                except Exception as error:  # reported; the soak goes on with what runs
                    log.exception("chaos: %s failed", action)
                    self.errors.append(f"{action}: {error!r}"[:500])

    async def act(self, action: str) -> None:
        if action == "restart_redis":
            log.info("chaos: restarting redis")
            await asyncio.to_thread(self.cluster.redis.kill)
            await asyncio.sleep(self.rng.uniform(0.2, 1.5))  # an outage, not just a blip
            await asyncio.to_thread(self.cluster.redis.start)
        else:
            role = action.removeprefix("kill_")
            alive = self.cluster.workers(role)
            if len(alive) <= self.min_alive:
                return
            victim = self.rng.choice(alive)
            log.info("chaos: SIGKILL %s, then a new %s worker", victim.name, role)
            await asyncio.to_thread(self.cluster.kill, victim)
            await asyncio.to_thread(self._replace, role)
        self.actions[action] += 1

    def _replace(self, role: str) -> ServiceProcess:
        process = self.cluster.spawn(role)
        self.cluster.wait_ready(process)
        return process

    def sample_rss(self) -> None:
        """Records every live process's resident memory (peaks kept by name)."""
        pids = {p.name: p.popen.pid for p in self.cluster.processes if p.alive}
        if self.cluster.redis.pid is not None:
            pids["redis"] = self.cluster.redis.pid
        for name, pid in pids.items():
            rss = rss_mib(pid)
            if rss is not None:
                self.peak_rss_mib[name] = max(rss, self.peak_rss_mib.get(name, 0.0))

    async def sample_rss_every(self, period_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample_rss()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period_s)
        self.sample_rss()
