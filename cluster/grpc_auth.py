"""Who may call a gRPC service: a server interceptor that refuses, with UNAUTHENTICATED, the
calls to chosen services whose metadata lacks the right credential, and a client interceptor
that adds a credential to every call of a channel.

Both are generic: the router checks its public API's bearer tokens with them
(`router.api_tokens`), the workers the cluster secret (`cluster.cluster_secret`). Services not
named (`grpc.health.v1`, reflection) stay open, so probes and `grpcurl list` need nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import grpc
from grpc import aio

log = logging.getLogger(__name__)

# The value of the credential's metadata key (None: absent) → whether the call may go on.
CredentialCheck = Callable[[str | None], bool]


class MetadataAuthInterceptor(aio.ServerInterceptor):
    """Refuses calls to `services` (full names, "tandem.v1.Router") unless `accepts` the value
    of metadata `key`; `on_refused(method)` runs for each refusal (a metric), and the client
    reads `hint` (never the expected value)."""

    def __init__(self, services: Collection[str], key: str, accepts: CredentialCheck,
                 hint: str, on_refused: Callable[[str], None] | None = None) -> None:
        self.services = frozenset(services)
        self.key = key
        self.accepts = accepts
        self.hint = hint
        self.on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        service = method.split("/")[1] if method.count("/") == 2 else ""  # "/pkg.Svc/Method"
        if handler is None or service not in self.services:
            return handler
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        value = next((v for k, v in metadata or () if k == self.key), None)
        if self.accepts(value if isinstance(value, str) else None):
            return handler
        log.warning("%s refused: %s", method, "no credential" if value is None
                    else "a wrong credential")
        if self.on_refused is not None:
            self.on_refused(method)
        return _refusing(handler, self.hint)


def _refusing(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind and codec as `handler` that only aborts: the servicer never
    runs."""

    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse, **codec)


def _with_metadata(details: aio.ClientCallDetails,
                   extra: Sequence[tuple[str, str]]) -> aio.ClientCallDetails:
    metadata = [*(details.metadata or ()), *extra]
    return aio.ClientCallDetails(details.method, details.timeout, aio.Metadata(*metadata),
                                 details.credentials, details.wait_for_ready)


class _AddMetadata:
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = tuple(metadata)

    async def _call(self, continuation: Any, details: aio.ClientCallDetails,
                    request: Any) -> Any:
        return await continuation(_with_metadata(details, self.metadata), request)


class _UnaryUnary(_AddMetadata, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _UnaryStream(_AddMetadata, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any,
                                     request: Any) -> Any:
        return await self._call(continuation, client_call_details, request)


class _StreamUnary(_AddMetadata, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await self._call(continuation, client_call_details, request_iterator)


class _StreamStream(_AddMetadata, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await self._call(continuation, client_call_details, request_iterator)


def metadata_interceptors(metadata: Sequence[tuple[str, str]]) -> list[aio.ClientInterceptor]:
    """Client interceptors (one per call kind) that add `metadata` to every call of a
    channel: `aio.insecure_channel(address, interceptors=metadata_interceptors(...))`."""
    return [cls(metadata) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
