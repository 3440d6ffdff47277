"""The process skeleton every service runs in: health SERVING once started, /metrics served,
the started/stopping hooks in order, NOT_SERVING before the grace period, a clean stop."""

from __future__ import annotations

import asyncio
import urllib.request

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from cluster.addresses import free_port
from cluster.process import ProcessOptions, serve_until_stopped
from cluster.tls import PLAINTEXT


async def health(address: str) -> int:
    async with aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2)
    return int(reply.status)


async def test_serves_until_stopped_with_hooks_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("tandem_test_things", "Things.", registry=registry).inc(3)
    metrics_port = free_port()
    events: list[str] = []
    seen: dict[str, int] = {}

    async def started(address: str) -> None:
        events.append(f"started {address}")

    options = ProcessOptions(name="test", listen="127.0.0.1:0", metrics_registry=registry,
                             metrics_listen=f"127.0.0.1:{metrics_port}", grace_s=1.0,
                             on_started=started, tls=PLAINTEXT)

    async def stopping() -> None:
        address = events[0].split()[1]
        seen["while stopping"] = await health(address)
        events.append("stopping")

    options.on_stopping = stopping
    task = asyncio.create_task(serve_until_stopped([], options))
    while not events:
        await asyncio.sleep(0.01)
    address = events[0].split()[1]
    assert await health(address) == health_pb2.HealthCheckResponse.SERVING
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read())
    assert b"tandem_test_things_total 3.0" in body
    options.stop.set()
    assert await asyncio.wait_for(task, 10) == address
    assert events[1] == "stopping"
    assert seen["while stopping"] == health_pb2.HealthCheckResponse.NOT_SERVING
