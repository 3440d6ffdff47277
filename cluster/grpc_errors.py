"""The one server interceptor that turns exceptions into gRPC status codes.

Servicers stay thin and raise domain errors (`cluster.errors`); this interceptor wraps every
method handler's behaviour (unary and streaming, async-generator and `context.write` styles)
and aborts the call with the matching status:

| exception                                   | status             |
| ------------------------------------------- | ------------------ |
| InvalidRequest, engine InvalidInput         | INVALID_ARGUMENT   |
| AlreadyRunning, engine DuplicateRequest     | ALREADY_EXISTS     |
| NoCapacity                                  | RESOURCE_EXHAUSTED |
| NoWorker, IndexUnavailable, EngineDead      | UNAVAILABLE        |
| DeadlineExceeded, TimeoutError              | DEADLINE_EXCEEDED  |
| Cancelled                                   | CANCELLED          |
| UnknownRequest                              | NOT_FOUND          |
| HandshakeMismatch                           | FAILED_PRECONDITION|
| TransferFailed                              | ABORTED            |
| Forbidden                                   | PERMISSION_DENIED  |
| LimitExceeded                               | RESOURCE_EXHAUSTED |
| a request message that does not parse      | INVALID_ARGUMENT ("request: malformed message") |
| anything else (a plain ValueError included) | INTERNAL (logged with its traceback) |

Only the dedicated types are the caller's fault: the engine's `InvalidInput`, whose message
starts with the field name ("max_tokens: must be >= 1"), and `InvalidRequest`. Any other
exception is a bug and reaches the client as INTERNAL, which the router may retry elsewhere,
never dressed as the caller's mistake. Why an interceptor that
rebuilds the handler rather than one that wraps `continuation`: a grpc.aio interceptor only sees
the handler object, not the running call, so the exception of a streaming handler surfaces while
its generator is iterated; wrapping the behaviour itself catches it there. A client that goes
away cancels the handler task: `asyncio.CancelledError` passes through untouched.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from cluster.errors import (
    AlreadyRunning,
    Cancelled,
    DeadlineExceeded,
    Forbidden,
    HandshakeMismatch,
    IndexUnavailable,
    InvalidRequest,
    LimitExceeded,
    NoCapacity,
    NoWorker,
    TransferFailed,
    UnknownRequest,
)
from engine.errors import DuplicateRequest, EngineDead, InvalidInput

logger = logging.getLogger(__name__)

# Checked in order: the first matching class wins (subclasses before their bases).
_MAX_CACHED_METHODS = 256  # wrapped handlers kept (ErrorMappingInterceptor): far above any server's
_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AlreadyRunning, grpc.StatusCode.ALREADY_EXISTS),
    (DuplicateRequest, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NoCapacity, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoWorker, grpc.StatusCode.UNAVAILABLE),
    (IndexUnavailable, grpc.StatusCode.UNAVAILABLE),
    (EngineDead, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (UnknownRequest, grpc.StatusCode.NOT_FOUND),
    (HandshakeMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (TransferFailed, grpc.StatusCode.ABORTED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a client sees for `exc`."""
    for cls, code in _STATUS_OF:
        if isinstance(exc, cls):
            return code, str(exc) or type(exc).__name__
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def _abort(context: aio.ServicerContext, method: str, exc: Exception) -> None:
    code, details = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("%s failed unexpectedly", method, exc_info=exc)
    else:
        logger.info("%s -> %s: %s", method, code.name, details)
    await context.abort(code, details)


@dataclass(frozen=True)
class _Malformed:
    """A request message that did not parse; the call answers INVALID_ARGUMENT."""

    error: str

    def check(self) -> None:
        raise InvalidRequest("request", f"malformed message: {self.error}")


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns `_Malformed` instead of raising: grpc answers a request
    that does not parse with INTERNAL ("Exception deserializing request!"), which would dress
    the caller's bytes as our bug."""
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return _Malformed(f"{type(exc).__name__}: {exc}")

    return parse


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Malformed):
                request.check()
            return await behavior(request, context)
        except aio.AbortError:
            raise  # the servicer aborted on its own: keep its status
        except Exception as exc:
            await _abort(context, method, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def gen_wrapper(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                if isinstance(request, _Malformed):
                    request.check()
                async for response in behavior(request, context):
                    yield response
            except aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, method, exc)

        return gen_wrapper
    return _wrap_unary(behavior, method)  # a coroutine that sends with context.write()


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Maps exceptions raised by any servicer method to gRPC status codes (see module doc).
    A method's wrapped handler is built once and kept while the handler it wraps is the same
    object (a servicer's are; an interceptor after this one may answer with a new one)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        if method in self._wrapped or len(self._wrapped) < _MAX_CACHED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler (run in a thread by grpc): left as it is
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
        if not handler.request_streaming:  # one request message: a bad one is the caller's
            codec["request_deserializer"] = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method), **codec)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method), **codec)
        return handler
