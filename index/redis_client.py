"""One way to talk to Redis: a bounded connection pool and a hard deadline on every operation.

Everything that touches Redis (prefix index, registry) goes through `connect()` and wraps each
operation in `bounded()`: whatever goes wrong (refused connection, a server that stopped
answering, a pool with no free connection, a pipeline stuck mid-reply) surfaces as
`IndexUnavailable` within `op_timeout_s`, never as a hang. The pool is a
`BlockingConnectionPool` because redis.asyncio's default pool raises past its connection limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from cluster.errors import IndexUnavailable


@dataclass(frozen=True)
class RedisConfig:
    """Where Redis is and how long anyone may wait for it."""

    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "tandem"  # key prefix: several clusters can share one Redis
    op_timeout_s: float = 0.5  # hard bound on one operation, connecting and retry included
    connect_timeout_s: float = 0.25
    max_connections: int = 32

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url: must be a redis:// URL, got {self.url!r}")
        if not self.namespace or ":" in self.namespace:
            raise ValueError(f"namespace: must be non-empty without ':', got {self.namespace!r}")
        if self.op_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("op_timeout_s: timeouts must be > 0")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: must be >= 1, got {self.max_connections}")


def connect(config: RedisConfig) -> Redis:
    """A client over a blocking pool; bytes in, bytes out (no decoding)."""
    # One immediate retry: the first command on a pooled connection that a Redis restart cut
    # fails once, and the retry on a fresh connection succeeds. `bounded` caps the total.
    retry = Retry(NoBackoff(), 1)
    pool = BlockingConnectionPool.from_url(
        config.url, max_connections=config.max_connections, timeout=config.op_timeout_s,
        socket_timeout=config.op_timeout_s, socket_connect_timeout=config.connect_timeout_s,
        retry=retry)
    return Redis(connection_pool=pool, retry=retry)


@asynccontextmanager
async def bounded(what: str, timeout_s: float) -> AsyncIterator[None]:
    """Runs the block under a deadline; any Redis failure becomes `IndexUnavailable`."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (RedisError, OSError, TimeoutError) as exc:  # TimeoutError: the deadline hit
        raise IndexUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc
