"""Bounded admission: at most `max_inflight` requests routed at once, `max_queue` waiting.

A request that finds the queue full is refused at once (RESOURCE_EXHAUSTED); one that waits
longer than `timeout_s` for a slot ends with DEADLINE_EXCEEDED. Slots are released in
`finally`, whatever ends the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cluster.errors import DeadlineExceeded, NoCapacity


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, timeout_s: float) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_inflight)
        self.waiting = 0
        self.inflight = 0
        self.rejected = 0
        self.timed_out = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked():  # no free slot: queue, if the queue has room
            if self.waiting >= self.max_queue:
                self.rejected += 1
                raise NoCapacity(f"router queue full ({self.waiting} requests waiting): "
                                 "the cluster is at capacity, retry later")
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
            except TimeoutError:
                self.timed_out += 1
                raise DeadlineExceeded(f"waited {self.timeout_s:g} s in the router queue "
                                       "without a free slot") from None
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()  # a free slot: returns at once
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._slots.release()
