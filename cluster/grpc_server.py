"""Builds the grpc.aio server every Tandem service runs in.

Each server gets the gRPC tracing interceptor when tracing is on
(`observability.grpc_tracing`), the error-mapping interceptor (`cluster.grpc_errors`), the standard
`grpc.health.v1` health service (every registered service, and "", report SERVING once started
and NOT_SERVING as soon as shutdown begins) and server reflection (so `grpcurl` can list and call
the services), and stops gracefully: health flips first, then in-flight calls get `grace`
seconds to finish before they are cancelled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.addresses import split_host_port
from cluster.grpc_errors import ErrorMappingInterceptor
from observability.grpc_tracing import server_interceptors

# Large prompts travel as token-id lists and transfer metadata as bytes: 64 MiB is far above
# any real message yet still bounds a runaway one.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # two servers on one port is a mistake, not load balancing
)


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer and how to add it: `name` is the full service name ("tandem.v1.Router")."""

    name: str
    add_to_server: Callable[[Any, aio.Server], None]
    servicer: Any


class GrpcServer:
    """A started server: its port, its health service, and graceful stop."""

    def __init__(self, server: aio.Server, port: int, host: str,
                 health: grpc_health.aio.HealthServicer, service_names: Sequence[str]) -> None:
        self.server = server
        self.port = port
        self.host = host
        self.health = health
        self.service_names = tuple(service_names)

    @property
    def address(self) -> str:
        """host:port clients dial."""
        return f"{self.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        """Flips the health status of every service (and of the server, "")."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Reports NOT_SERVING, refuses new calls and lets running ones finish for `grace` s."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(services: Sequence[ServiceBinding], address: str = "127.0.0.1:0", *,
                       interceptors: Sequence[aio.ServerInterceptor] = (),
                       options: Sequence[tuple[str, Any]] = (),
                       credentials: grpc.ServerCredentials | None = None) -> GrpcServer:
    """Builds, binds and starts a server for `services` on `address` ("host:0" picks a port):
    a TLS port with `credentials` (`cluster.tls.TlsConfig.server_credentials`), else a
    plaintext one."""
    host, _ = split_host_port(address, "listen")
    server = aio.server(
        interceptors=[*server_interceptors(), ErrorMappingInterceptor(), *interceptors],
        options=list({**dict(_DEFAULT_OPTIONS), **dict(options)}.items()))  # given ones win
    for binding in services:
        binding.add_to_server(binding.servicer, server)
    health = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [binding.name for binding in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    port = (server.add_insecure_port(address) if credentials is None
            else server.add_secure_port(address, credentials))
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    started = GrpcServer(server, port, host, health, names)
    await started.set_serving(True)
    return started


def service_name(file_descriptor: Any, service: str) -> str:
    """Full name of `service` in a generated `_pb2` module's DESCRIPTOR."""
    return str(file_descriptor.services_by_name[service].full_name)
