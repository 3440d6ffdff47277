"""Fixtures for the cluster tests: a private redis-server per test and a client on it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from cli.redis_server import LocalRedisServer
from index.redis_client import RedisConfig, connect


@pytest.fixture
def redis_server() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as server:
        yield server


@pytest.fixture
def redis_config(redis_server: LocalRedisServer) -> RedisConfig:
    # Short timeouts: the outage tests assert that failures surface within them.
    return RedisConfig(url=redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}",
                       op_timeout_s=1.0, connect_timeout_s=0.5)


@pytest.fixture
async def redis_client(redis_config: RedisConfig) -> AsyncIterator[Redis]:
    client = connect(redis_config)
    yield client
    await client.aclose()
