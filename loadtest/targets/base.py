"""The interface every target implements, and the events its streams yield."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from loadtest.request import Request


@dataclass(frozen=True)
class Tokens:
    """A stream message carrying `count` generated tokens (the runner stamps its arrival)."""

    count: int


@dataclass(frozen=True)
class Finished:
    """The end of a stream, with the server's own counts when it gives them."""

    finish_reason: str | None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None


class TargetError(Exception):
    """A request the server refused or failed: `code` is the gRPC status name or the HTTP
    status, `message` what it said."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Target(Protocol):
    """A server under load. Used as `async with target:`; `stream` may run many times at once."""

    name: str

    async def __aenter__(self) -> Target: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def stream(self, request: Request, request_id: str) -> AsyncIterator[Tokens | Finished]:
        """Sends one request; yields `Tokens` as messages arrive, then one `Finished`; raises
        `TargetError` when the server ends the request with an error."""
        ...

    async def cluster_status(self) -> dict[str, Any] | None:
        """The server's own counters now (`{"router": {...}, "workers": {id: {...}}}`), or None
        when it has no such view."""
        ...
