"""gRPC tracing from the kept library: opentelemetry-instrumentation-grpc's aio interceptors.

    server = aio.server(interceptors=[*server_interceptors(), ...])   # a SERVER span per call
    channel = aio.insecure_channel(address, interceptors=client_interceptors())  # CLIENT spans

The server interceptor makes each handled call's SERVER span, child of the caller's span found
in the call's `traceparent` metadata, and current while the handler runs (handlers add their own
attributes with `observability.tracing.annotate`); the client interceptors make a CLIENT span
per call, kept open until a response stream is read to its end, and send `traceparent`. Both
record with the provider `observability.tracing` uses; with tracing off they are not installed
at all, so an untraced process pays nothing. Health checks, reflection and the router's
status polls (`Worker/Status` several times a second, `Router/GetClusterStatus`) are not traced.
"""

from __future__ import annotations

from typing import Any

from observability.tracing import recording_provider

_UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                      "grpc.reflection.v1.ServerReflection")
_UNTRACED_METHODS = ("/tandem.v1.Worker/Status", "/tandem.v1.Router/GetClusterStatus")


def _traced() -> Any:
    """The instrumentation filter: True for the calls that get spans."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(
        *(filters.service_name(name) for name in _UNTRACED_SERVICES),
        *(filters.full_method_name(name) for name in _UNTRACED_METHODS)))


def server_interceptors() -> list[Any]:
    """The instrumentation's server interceptor, or [] when tracing is off. Put it first, so its
    span covers the other interceptors (the error mapping's status lands on it)."""
    provider = recording_provider()
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=provider, filter_=_traced())]


def client_interceptors() -> list[Any]:
    """The instrumentation's client interceptors for a channel, or [] when tracing is off."""
    provider = recording_provider()
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=provider, filter_=_traced()))
