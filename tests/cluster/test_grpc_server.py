"""The server helper: health service, reflection, graceful stop, over real loopback gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cluster.grpc_server import GrpcServer, ServiceBinding, service_name, start_server
from tandem_proto.tandem.v1 import router_pb2, router_pb2_grpc

ROUTER = service_name(router_pb2.DESCRIPTOR, "Router")


class SlowRouter(router_pb2_grpc.RouterServicer):
    """GetClusterStatus takes `delay` seconds (to observe graceful stop)."""

    delay = 0.0

    async def GetClusterStatus(self, request: router_pb2.GetClusterStatusRequest,
                               context: aio.ServicerContext) -> router_pb2.GetClusterStatusResponse:
        await asyncio.sleep(self.delay)
        return router_pb2.GetClusterStatusResponse(policy="round_robin")


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    started = await start_server(
        [ServiceBinding(ROUTER, router_pb2_grpc.add_RouterServicer_to_server, SlowRouter())])
    yield started
    await started.stop(grace=None)


async def test_health_reports_serving(server: GrpcServer) -> None:
    async with aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", ROUTER):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        await server.set_serving(False)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=ROUTER), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def _reflect(address: str) -> tuple[set[str], list[str]]:
    """Uses the (synchronous) reflection client, as grpcurl would."""
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        file = db.FindFileContainingSymbol(ROUTER)
        return services, [method.name for method in file.service[0].method]


async def test_reflection_lists_services(server: GrpcServer) -> None:
    services, methods = await asyncio.to_thread(_reflect, server.address)
    assert services == {ROUTER, "grpc.health.v1.Health",
                        "grpc.reflection.v1alpha.ServerReflection"}
    assert methods == ["Generate", "GetClusterStatus"]


async def test_graceful_stop_finishes_running_calls(server: GrpcServer) -> None:
    SlowRouter.delay = 0.3
    try:
        async with aio.insecure_channel(server.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            call = asyncio.ensure_future(
                stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5))
            await asyncio.sleep(0.1)  # the call is running on the server
            await server.stop(grace=2.0)
            assert (await call).policy == "round_robin"
            with pytest.raises(aio.AioRpcError) as info:
                await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        SlowRouter.delay = 0.0


async def test_port_zero_picks_a_free_port(server: GrpcServer) -> None:
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"
