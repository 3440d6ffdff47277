"""Cancelling work when the HTTP client goes away.

A streamed response is watched by Starlette itself (it cancels the body's iteration when the
ASGI server reports `http.disconnect`). Before a response starts (a non-streamed request, or a
streamed one waiting for its first token) nothing watches: `unless_disconnected` races the work
against the disconnect, and cancels the work (and with it the router's request, which releases
what the workers hold) when the client leaves first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its response started."""


async def _disconnected(request: Request) -> None:
    # The body was read already: the next message the server gives is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, unless the client disconnects first: then `work` is cancelled and
    `ClientDisconnected` raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected("the client went away")
    return task.result()
