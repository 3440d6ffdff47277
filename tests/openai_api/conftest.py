"""The API over a real router in this process: scripted workers over real gRPC
(tests/router/fakes.py), a real redis-server, uvicorn on loopback, and the official openai SDK
as the client. The real workers behind the same API are tests/e2e/test_openai_api.py's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
import pytest

from cli.redis_server import LocalRedisServer
from cluster.grpc_server import start_server
from cluster.roles import Role
from cluster.tls import PLAINTEXT
from index.redis_client import RedisConfig, connect
from index.registry import WorkerRegistry
from openai_api.app import build_app
from openai_api.server import HttpServer
from router.__main__ import build_router, grpc_interceptors, router_binding
from router.api_tokens import ApiTokens
from router.config import RouterConfig
from router.router import Router
from router.token_streams import TokenStreams
from tests.router.fakes import FakeDecode, FakePrefill, serve


@dataclass
class Api:
    router: Router
    prefill: list[FakePrefill]
    decode: list[FakeDecode]
    base_url: str  # http://host:port/v1
    client: openai.AsyncOpenAI  # no retries: each error is seen as the server sent it
    grpc_address: str  # the same router's tandem.v1.Router, as `router/__main__` serves it


@pytest.fixture(scope="module")
def redis() -> Iterator[LocalRedisServer]:
    with LocalRedisServer() as server:
        yield server


Factory = Callable[..., AbstractAsyncContextManager[Api]]


@pytest.fixture
def make_api(redis: LocalRedisServer, tiny_chat_llama: Path) -> Iterator[Factory]:
    """`async with make_api(prefill=1, decode=1, **router_config) as api`."""
    namespaces = iter(range(1000))

    @asynccontextmanager
    async def make(prefill: int = 1, decode: int = 1, model: Path | None = None,
                   api_tokens: Sequence[str] = (), **overrides: Any) -> AsyncIterator[Api]:
        namespace = f"api{next(namespaces)}"
        config = RouterConfig(model=str(model or tiny_chat_llama), redis_url=redis.url,
                              tls=PLAINTEXT,
                              namespace=namespace, refresh_interval_s=0.05,
                              prefix_index="pipelined", http_listen="127.0.0.1:0")
        config = replace(config, **overrides)
        client = connect(RedisConfig(url=redis.url, namespace=namespace))
        registry = WorkerRegistry(client, RedisConfig(url=redis.url, namespace=namespace),
                                  ttl_s=60)
        fakes_p = [FakePrefill(f"p{i}", Role.PREFILL) for i in range(prefill)]
        fakes_d = [FakeDecode(f"d{i}", Role.DECODE) for i in range(decode)]
        fakes: list[FakePrefill | FakeDecode] = [*fakes_p, *fakes_d]
        for fake in fakes:
            await serve(fake, registry)
        router = await build_router(config)
        tokens = ApiTokens(tuple(t.encode() for t in api_tokens)) if api_tokens else None
        streams = TokenStreams(config.max_streams_per_token) if tokens is not None else None
        http = HttpServer(build_app(router, tokens, streams), config.http_listen, grace_s=2.0)
        grpc_server = await start_server(
            [router_binding(router, streams)], interceptors=grpc_interceptors(router, tokens),
            options=[("grpc.max_receive_message_length", config.max_request_bytes)])
        try:
            while len(router.pool.live(Role.PREFILL)) + len(router.pool.live(Role.DECODE)) < \
                    prefill + decode:
                await asyncio.sleep(0.02)
            address = await http.start()
            base_url = f"http://{address}/v1"
            async with openai.AsyncOpenAI(base_url=base_url,
                                          api_key=api_tokens[0] if api_tokens else "none",
                                          max_retries=0, timeout=30) as sdk:
                yield Api(router, fakes_p, fakes_d, base_url, sdk, grpc_server.address)
        finally:
            await grpc_server.stop(None)
            await http.stop()
            await router.close()
            for fake in fakes:
                assert fake.server is not None
                await fake.server.stop(None)
            await client.aclose()

    yield make
