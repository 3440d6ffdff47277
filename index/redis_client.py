"""One way to talk to Redis: a bounded connection pool and a hard deadline on every operation.

Everything that touches Redis (prefix index, registry) goes through `connect()` and wraps each
operation in `bounded()`: whatever goes wrong (refused connection, a server that stopped
answering, a pool with no free connection, a pipeline stuck mid-reply) surfaces as
`IndexUnavailable` within `op_timeout_s`, never as a hang; a cancelled task stays cancelled,
whatever error the client made of the cancel. The pool is a
`BlockingConnectionPool` because redis.asyncio's default pool raises past its connection limit.

A Redis with a password takes it in the URL (`redis://:PASSWORD@host:6379/0`; `rediss://` for
TLS, with `?ssl_ca_certs=/path/ca.pem`, redis-py's own URL arguments). A wrong or missing
password is `RedisAuthFailed`, which says so, rather than redis-py's handshake message; a
process checks it once at start (`check_auth`) and refuses to run with credentials Redis
refuses, while an unreachable Redis is only a warning (it may come up later).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from cluster.errors import IndexUnavailable

_AUTH_HINT = ("Redis refused the credentials (a wrong or missing password): give the password "
              "in redis_url, redis://:PASSWORD@host:port/0 (TANDEM_REDIS_URL)")


class RedisAuthFailed(IndexUnavailable):
    """Redis refused this client's password (or wants one and got none)."""


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
    """Runs the block under a deadline; any Redis failure becomes `IndexUnavailable`.

    A cancel of the calling task always ends as CancelledError, even where redis-py turned it
    into a connection error (then `IndexUnavailable` would be retried by a background loop) or
    caught it and retried the command on a fresh connection (`connect`'s one retry), so that
    the block returned normally: either way a loop's `stop()` would wait forever."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0

    def cancelled() -> bool:
        return task is not None and task.cancelling() > before

    try:
        async with asyncio.timeout(timeout_s):
            yield
    except AuthenticationError as exc:
        raise RedisAuthFailed(f"redis {what} failed: {_AUTH_HINT} ({exc})") from exc
    except (RedisError, OSError, TimeoutError) as exc:  # TimeoutError: the deadline hit
        if cancelled():
            raise asyncio.CancelledError(f"redis {what} cancelled") from exc
        raise IndexUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc
    if cancelled():
        raise asyncio.CancelledError(f"redis {what} cancelled (the client swallowed it)")


async def check_auth(redis: Redis, config: RedisConfig) -> None:
    """Pings Redis once: `RedisAuthFailed` if it refuses the credentials; anything else (Redis
    down) is left to the callers' retries."""
    try:
        async with bounded("ping", config.op_timeout_s):
            await redis.ping()
    except RedisAuthFailed:
        raise
    except IndexUnavailable:
        pass
