"""Background tasks a service starts and must not lose: kept, their failures logged,
cancelled and awaited on close.

    tasks = BackgroundTasks("decode worker d-1")
    tasks.spawn(self._expire_leases(), "lease expiry")
    tasks.spawn(self._release_later(5.0, request_id), f"quarantine release {request_id}")
    await tasks.close()          # on stop: cancel every task still running and wait for it

asyncio keeps only a weak reference to a task: one started with `ensure_future` and dropped
can be garbage-collected mid-flight, and an exception it raises is reported (if ever) only
when it is collected. `asyncio.TaskGroup` keeps its tasks, but one failure cancels all the
others and it only ends with its `async with` block: wrong for long-lived services whose
tasks come and go independently, hence this small set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTasks:
    """A set of running tasks owned by one service object."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Starts `coro` as a task named `name`, kept until it ends; a failure is logged with
        its traceback. Raises RuntimeError once closed (the coroutine is closed)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.owner}: background tasks are closed; not starting "
                               f"{name!r}")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("%s: background task %r failed", self.owner, task.get_name(),
                      exc_info=error)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Cancels every task still running and waits (at most `timeout_s`) for them to end;
        refuses new ones from now on."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.warning("%s: background task %r did not stop within %s s", self.owner,
                            task.get_name(), timeout_s)
