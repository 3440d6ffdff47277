"""Concurrent generations per API token, across both fronts.

    streams = TokenStreams(config.max_streams_per_token)
    with streams.stream(authorization):     # LimitExceeded when the token already runs `limit`
        ...                                 # the whole generation, streamed body included

The gRPC servicer holds a slot for a `Generate` call, the HTTP middleware (`openai_api.auth`)
for a POST; the key is the bearer token the auth check already accepted, so one tenant cannot
take every in-flight slot of the router. Only with `api_tokens_file`: without tokens there is
no tenant to count, and `max_inflight` / `max_queue` bound everyone together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.errors import LimitExceeded

_SCHEME = "bearer "


class TokenStreams:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[bytes, int] = {}  # sha256 of the token → generations running
        self.refused = 0

    def running(self, authorization: str | None) -> int:
        return self._running.get(self._key(authorization), 0)

    @staticmethod
    def _key(authorization: str | None) -> bytes:
        token = (authorization or "")[len(_SCHEME):].strip()
        return hashlib.sha256(token.encode()).digest()  # the token itself is not kept

    def acquire(self, authorization: str | None) -> bytes:
        """Takes one of the token's `limit` slots (LimitExceeded when none is free); returns
        the key to `release`."""
        key = self._key(authorization)
        running = self._running.get(key, 0)
        if running >= self.limit:
            self.refused += 1
            raise LimitExceeded(f"this API token already runs {running} generations; the "
                                f"limit is {self.limit} (max_streams_per_token): retry when "
                                "one ends")
        self._running[key] = running + 1
        return key

    def release(self, key: bytes) -> None:
        left = self._running[key] - 1
        if left:
            self._running[key] = left
        else:
            del self._running[key]

    @contextmanager
    def stream(self, authorization: str | None) -> Iterator[None]:
        """One slot for the duration of the block."""
        key = self.acquire(authorization)
        try:
            yield
        finally:
            self.release(key)
