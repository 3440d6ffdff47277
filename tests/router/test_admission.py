"""Bounded admission: in-flight slots, a bounded queue, a queue deadline, slots always freed."""

from __future__ import annotations

import asyncio

import pytest

from cluster.errors import DeadlineExceeded, NoCapacity
from router.admission import Admission


async def test_full_queue_is_refused_at_once_and_slots_are_reused() -> None:
    admission = Admission(max_inflight=1, max_queue=1, timeout_s=5.0)
    release = asyncio.Event()

    async def hold() -> None:
        async with admission.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert admission.inflight == 1 and admission.waiting == 1
    with pytest.raises(NoCapacity, match="queue full"):
        async with admission.slot():
            pass
    assert admission.rejected == 1
    release.set()
    await asyncio.gather(holder, waiter)
    assert admission.inflight == 0 and admission.waiting == 0


async def test_queue_deadline_and_errors_release_the_slot() -> None:
    admission = Admission(max_inflight=1, max_queue=4, timeout_s=0.05)
    with pytest.raises(RuntimeError):
        async with admission.slot():
            raise RuntimeError("request failed")
    assert admission.inflight == 0
    async with admission.slot():
        with pytest.raises(DeadlineExceeded, match="router queue"):
            async with admission.slot():
                pass
    assert admission.timed_out == 1 and admission.waiting == 0
    async with admission.slot():
        assert admission.inflight == 1
