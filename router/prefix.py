"""Prefix lookups with an explicit index mode: exact (Redis answers) or degraded (it does not).

In degraded mode the router routes by load alone (`least_loaded`), counts every such decision,
and tries Redis again at most every `retry_s`; the first lookup that succeeds returns it to
exact mode. Both transitions are logged.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Collection, Sequence

from cluster.errors import IndexUnavailable
from cluster.prefix_index import PrefixIndexReader
from engine.block_hash import BlockHash

log = logging.getLogger(__name__)


class IndexMode(enum.StrEnum):
    EXACT = "exact"
    DEGRADED = "degraded"


class PrefixLookup:
    def __init__(self, reader: PrefixIndexReader, retry_s: float = 1.0) -> None:
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
