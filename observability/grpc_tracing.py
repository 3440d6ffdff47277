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

A response stream whose caller cancels mid-stream is a case the instrumentation gets wrong on its
own: grpc cancels the task while the instrumentation's async generator waits at a `yield`, so the
generator is left for the event loop to finalize in another task, where leaving its span's
context fails ("Failed to detach context", logged as an error). `server_interceptors` therefore
hands grpc a coroutine that writes each response itself and closes the generator in its own
task, on every way out.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

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

    return [_ClosingStreams(aio_server_interceptor(tracer_provider=provider, filter_=_traced()))]


class _ClosingStreams(aio.ServerInterceptor):
    """Runs `inner` (the instrumentation's interceptor), then turns each response-streaming
    handler it returns into a coroutine that sends with `context.write` and always closes the
    handler's generator in the call's own task (see the module doc)."""

    def __init__(self, inner: aio.ServerInterceptor) -> None:
        self._inner = inner

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await self._inner.intercept_service(continuation, handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_written(handler.unary_stream), **codec)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(_written(handler.stream_stream),
                                                         **codec)
        return handler


_StreamBehavior = Callable[[Any, Any], AsyncGenerator[Any, None]]


def _written(behavior: _StreamBehavior) -> Callable[[Any, Any], Awaitable[None]]:
    """`behavior` (an async generator function) as a coroutine handler: each response goes out
    with `context.write`, and the generator is closed here, in this task, however the call
    ends (a cancel arrives in `write`, so the close still runs in the call's task)."""
    async def write_all(request: Any, context: Any) -> None:
        responses = behavior(request, context)
        try:
            async for response in responses:
                await context.write(response)
        finally:
            await responses.aclose()

    return write_all


def client_interceptors() -> list[Any]:
    """The instrumentation's client interceptors for a channel, or [] when tracing is off."""
    provider = recording_provider()
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=provider, filter_=_traced()))
