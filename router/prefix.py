"""Prefix lookups with an explicit index mode: exact (Redis answers) or degraded (it does not).

In degraded mode the router routes by load alone (`least_loaded`), counts every such decision,
and tries Redis again at most every `retry_s`; the first lookup that succeeds returns it to
exact mode. Both transitions are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from cluster.errors import IndexUnavailable
from engine.block_hash import BlockHash
from index.prefix_tail import PrefixIndexTail
from router.config import RouterConfig

log = logging.getLogger(__name__)


class IndexMode(enum.StrEnum):
    EXACT = "exact"
    DEGRADED = "degraded"


class IndexSource(Protocol):
    async def lookup(self, hashes: Sequence[BlockHash],
                     workers: Collection[str]) -> dict[str, int]: ...

    async def close(self) -> None: ...


class TailSource:
    """The in-memory index (`PrefixIndexTail`) as a lookup source: a background task syncs it
    from the streams of `workers()` (the router passes those whose registry heartbeat is live,
    so a dead worker's entries go when its heartbeat lapses) every `sync_interval_s`; a lookup
    never touches Redis, but raises IndexUnavailable when the last successful sync is older
    than `stale_after_s`."""

    def __init__(self, tail: PrefixIndexTail, workers: Callable[[], Collection[str]],
                 sync_interval_s: float = RouterConfig.tail_sync_interval_s,
                 stale_after_s: float = RouterConfig.tail_stale_after_s) -> None:
        self.tail = tail
        self.workers = workers
        self.sync_interval_s = sync_interval_s
        self.stale_after_s = stale_after_s
        self.last_sync = 0.0
        self.error = "never synced"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stops the background sync."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def counters(self) -> dict[str, float]:
        """The tail's resyncs by reason and dropped workers, for GetClusterStatus."""
        return {**{f"index_resyncs/{reason}": count
                   for reason, count in self.tail.resyncs.items()},
                "index_drops": self.tail.drops, "index_sync_failures": self.tail.sync_failures}

    async def lookup(self, hashes: Sequence[BlockHash],
                     workers: Collection[str]) -> dict[str, int]:
        if time.monotonic() - self.last_sync > self.stale_after_s:
            raise IndexUnavailable(f"in-memory prefix index is stale: {self.error}")
        return self.tail.lookup(hashes, workers)

    async def _run(self) -> None:
        while True:
            try:
                await self.tail.sync(self.workers())
                self.last_sync = time.monotonic()
            except IndexUnavailable as error:
                self.error = str(error)
            await asyncio.sleep(self.sync_interval_s)


class PrefixLookup:
    def __init__(self, reader: IndexSource,
                 retry_s: float = RouterConfig.index_retry_s) -> None:
        self.reader = reader
        self.retry_s = retry_s
        self.mode = IndexMode.EXACT
        self.detail = ""
        self.degraded_lookups = 0
        self.transitions = 0
        self._next_try = 0.0

    async def lookup(self, hashes: Sequence[BlockHash],
                     workers: Collection[str]) -> dict[str, int] | None:
        """Leading cached blocks per worker, or None in degraded mode."""
        if self.mode is IndexMode.DEGRADED and time.monotonic() < self._next_try:
            self.degraded_lookups += 1
            return None
        try:
            hits = await self.reader.lookup(hashes, workers)
        except IndexUnavailable as error:
            self._next_try = time.monotonic() + self.retry_s
            if self.mode is IndexMode.EXACT:
                self.mode, self.detail = IndexMode.DEGRADED, str(error)
                self.transitions += 1
                log.warning("prefix index unavailable (%s): degraded mode, routing by load",
                            error)
            self.degraded_lookups += 1
            return None
        if self.mode is IndexMode.DEGRADED:
            log.warning("prefix index reachable again: exact mode")
            self.mode, self.detail = IndexMode.EXACT, ""
            self.transitions += 1
        return hits

    async def close(self) -> None:
        await self.reader.close()
