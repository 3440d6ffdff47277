"""`cluster.background.BackgroundTasks`: tasks kept until they end, failures logged, all
cancelled and awaited on close."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging

import pytest

from cluster.background import BackgroundTasks


async def test_a_task_nobody_else_references_runs_to_the_end() -> None:
    tasks = BackgroundTasks("test")
    done = asyncio.Event()

    async def later() -> None:
        await asyncio.sleep(0.05)
        gc.collect()  # asyncio holds tasks weakly: only the set keeps this one alive
        done.set()

    tasks.spawn(later(), "later")
    gc.collect()
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(0)
    assert len(tasks) == 0  # forgotten once ended


async def test_a_failure_is_logged_with_the_task_name(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("decode worker d-1")

    async def broken() -> None:
        raise RuntimeError("engine gone")

    with caplog.at_level(logging.ERROR, logger="cluster.background"):
        task = tasks.spawn(broken(), "quarantine release r1")
        await asyncio.wait([task])
        await asyncio.sleep(0)
    [record] = [r for r in caplog.records if r.name == "cluster.background"]
    assert "decode worker d-1" in record.getMessage()
    assert "quarantine release r1" in record.getMessage()
    assert record.exc_info is not None and "engine gone" in str(record.exc_info[1])
    assert len(tasks) == 0


async def test_close_cancels_and_awaits_then_refuses(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("test")
    cleaned = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    task = tasks.spawn(forever(), "forever")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="cluster.background"):
        await tasks.close()
    assert task.cancelled() and cleaned.is_set()
    assert not caplog.records  # a cancel is not a failure
    assert tasks.closed

    async def late() -> None:
        pass

    coro = late()
    with pytest.raises(RuntimeError, match="closed"):
        tasks.spawn(coro, "late")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # not "never awaited"


async def test_close_gives_up_on_a_task_that_will_not_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks("test")
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # swallows the cancel (a bug in the task, not in the set)

    task = tasks.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="cluster.background"):
        await tasks.close(timeout_s=0.1)
    assert "did not stop" in caplog.text and not task.done()
    release.set()
    task.cancel()
    await asyncio.wait([task])
