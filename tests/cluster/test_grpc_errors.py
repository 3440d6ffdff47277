"""Domain errors reach a real gRPC client (loopback) as the right status, unary and streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from cluster import cluster_secret
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
    UnknownRequest,
)
from cluster.grpc_errors import status_for
from cluster.grpc_server import GrpcServer, ServiceBinding, service_name, start_server
from engine.errors import DuplicateRequest, EngineDead, InvalidInput
from tandem_proto.tandem.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

CASES: list[tuple[Exception, grpc.StatusCode, str]] = [
    (InvalidRequest("sampling.top_p", "must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_p: must be in (0, 1]"),
    (InvalidInput("max_tokens: must be >= 1"), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens: must be >= 1"),
    (DuplicateRequest("request_id: 'r.0' is already running"), grpc.StatusCode.ALREADY_EXISTS,
     "already running"),
    (AlreadyRunning("request_id: 'r' is already running"), grpc.StatusCode.ALREADY_EXISTS,
     "already running"),
    (EngineDead("engine failed"), grpc.StatusCode.UNAVAILABLE, "engine failed"),
    (NoCapacity("decode-0: no free blocks"), grpc.StatusCode.RESOURCE_EXHAUSTED, "no free blocks"),
    (NoWorker("no live decode worker"), grpc.StatusCode.UNAVAILABLE, "no live decode worker"),
    (IndexUnavailable("redis timeout"), grpc.StatusCode.UNAVAILABLE, "redis timeout"),
    (DeadlineExceeded("transfer: 2.0 s"), grpc.StatusCode.DEADLINE_EXCEEDED, "transfer"),
    (Cancelled("client went away"), grpc.StatusCode.CANCELLED, "client went away"),
    (UnknownRequest("req-9"), grpc.StatusCode.NOT_FOUND, "req-9"),
    (Forbidden("target.grant: expired"), grpc.StatusCode.PERMISSION_DENIED, "target.grant"),
    (LimitExceeded("the limit is 2 (max_streams_per_token)"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "max_streams_per_token"),
    (HandshakeMismatch("p0", "d0", "block_size 16 vs 32"), grpc.StatusCode.FAILED_PRECONDITION,
     "p0 -> d0: block_size 16 vs 32"),
    (RuntimeError("kaboom"), grpc.StatusCode.INTERNAL, "RuntimeError: kaboom"),
    # a plain ValueError is a bug inside a service, not the caller's mistake
    (ValueError("list.remove(x): x not in list"), grpc.StatusCode.INTERNAL,
     "ValueError: list.remove(x): x not in list"),
]
IDS = [type(exc).__name__ for exc, _, _ in CASES]


class FailingRouter(router_pb2_grpc.RouterServicer):
    """Streams one token, then raises `error`; the unary call raises it at once."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    async def Generate(self, request: router_pb2.GenerateRequest,
                       context: aio.ServicerContext) -> AsyncIterator[router_pb2.GenerateResponse]:
        yield router_pb2.GenerateResponse(request_id="r1", token_ids=[7])
        if self.error is not None:
            raise self.error
        yield router_pb2.GenerateResponse(
            request_id="r1", finish_reason=common_pb2.FINISH_REASON_STOP)

    async def GetClusterStatus(self, request: router_pb2.GetClusterStatusRequest,
                               context: aio.ServicerContext) -> router_pb2.GetClusterStatusResponse:
        if self.error is not None:
            raise self.error
        return router_pb2.GetClusterStatusResponse(policy="kv_aware")


class WritingDecode(decode_pb2_grpc.DecodeServicer):
    """A streaming handler written with context.write() instead of an async generator."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    async def Decode(self, request: decode_pb2.DecodeRequest, context: aio.ServicerContext) -> None:
        await context.write(decode_pb2.DecodeResponse(token_ids=[request.first_token_id]))
        if self.error is not None:
            raise self.error


@pytest.fixture
async def server() -> AsyncIterator[tuple[GrpcServer, FailingRouter, WritingDecode]]:
    router, decode = FailingRouter(), WritingDecode()
    started = await start_server([
        ServiceBinding(service_name(router_pb2.DESCRIPTOR, "Router"),
                       router_pb2_grpc.add_RouterServicer_to_server, router),
        ServiceBinding(service_name(decode_pb2.DESCRIPTOR, "Decode"),
                       decode_pb2_grpc.add_DecodeServicer_to_server, decode),
    ])
    yield started, router, decode
    await started.stop(grace=None)


@pytest.fixture
async def channel(server: tuple[GrpcServer, Any, Any]) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(server[0].address) as chan:
        yield chan


@pytest.mark.parametrize(("error", "code", "detail"), CASES, ids=IDS)
async def test_unary_maps_error(server: tuple[GrpcServer, FailingRouter, Any],
                                channel: aio.Channel, error: Exception,
                                code: grpc.StatusCode, detail: str) -> None:
    server[1].error = error
    stub = router_pb2_grpc.RouterStub(channel)
    with pytest.raises(aio.AioRpcError) as info:
        await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
    assert info.value.code() == code
    assert detail in (info.value.details() or "")


@pytest.mark.parametrize(("error", "code", "detail"), CASES, ids=IDS)
async def test_stream_maps_error_after_first_message(
        server: tuple[GrpcServer, FailingRouter, Any], channel: aio.Channel,
        error: Exception, code: grpc.StatusCode, detail: str) -> None:
    server[1].error = error
    stub = router_pb2_grpc.RouterStub(channel)
    received: list[list[int]] = []
    with pytest.raises(aio.AioRpcError) as info:
        async for response in stub.Generate(router_pb2.GenerateRequest(text="hi"), timeout=5):
            received.append(list(response.token_ids))
    assert received == [[7]]
    assert info.value.code() == code
    assert detail in (info.value.details() or "")


async def test_stream_written_with_context_write_maps_error(
        server: tuple[GrpcServer, Any, WritingDecode], channel: aio.Channel) -> None:
    server[2].error = NoCapacity("no free blocks")
    stub = decode_pb2_grpc.DecodeStub(channel)
    call = stub.Decode(decode_pb2.DecodeRequest(request_id="r", first_token_id=5), timeout=5)
    first = await call.read()
    assert list(first.token_ids) == [5]
    with pytest.raises(aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_success_is_untouched(server: tuple[GrpcServer, FailingRouter, Any],
                                    channel: aio.Channel) -> None:
    stub = router_pb2_grpc.RouterStub(channel)
    status = await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
    assert status.policy == "kv_aware"
    messages = [m async for m in stub.Generate(router_pb2.GenerateRequest(text="x"), timeout=5)]
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_STOP


async def test_unexpected_error_logs_traceback(server: tuple[GrpcServer, FailingRouter, Any],
                                               channel: aio.Channel,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server[1].error = KeyError("missing")
    stub = router_pb2_grpc.RouterStub(channel)
    with pytest.raises(aio.AioRpcError):
        await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5)
    records = [r for r in caplog.records if r.name == "cluster.grpc_errors"]
    assert records and records[-1].exc_info is not None
    assert "GetClusterStatus" in records[-1].getMessage()


def test_only_unexpected_errors_are_internal() -> None:
    for error, code, _ in CASES:
        expected_internal = type(error) in (RuntimeError, ValueError)
        assert (status_for(error)[0] == grpc.StatusCode.INTERNAL) is expected_internal
        assert status_for(error)[0] == code


@pytest.mark.parametrize("method", ["/tandem.v1.Router/GetClusterStatus",
                                    "/tandem.v1.Router/Generate"])
async def test_a_request_that_does_not_parse_is_invalid_argument_not_internal(
        server: tuple[GrpcServer, FailingRouter, Any], channel: aio.Channel,
        method: str) -> None:
    call = (channel.unary_unary if method.endswith("Status") else channel.unary_stream)(method)
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length past the end of the message
    with pytest.raises(aio.AioRpcError) as info:
        reply = call(garbage, timeout=5)
        if method.endswith("Generate"):
            async for _ in reply:  # type: ignore[union-attr]
                pass
        else:
            await reply  # type: ignore[misc]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request: malformed message" in (info.value.details() or "")


async def test_a_later_interceptors_refusal_is_never_kept_for_the_next_call() -> None:
    """The error mapping keeps each method's wrapped handler; the auth interceptor after it
    answers a refused call with a handler of its own, which must not outlive that call (nor
    the servicer's be kept for a refused one)."""
    router = FailingRouter()
    started = await start_server(
        [ServiceBinding(service_name(router_pb2.DESCRIPTOR, "Router"),
                        router_pb2_grpc.add_RouterServicer_to_server, router)],
        interceptors=[cluster_secret.server_interceptor("s3cret", ["tandem.v1.Router"])])
    good = cluster_secret.call_metadata("s3cret")
    try:
        async with aio.insecure_channel(started.address) as chan:
            stub = router_pb2_grpc.RouterStub(chan)
            for metadata in (good, (), (), good, good, ()):
                call = stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5,
                                             metadata=metadata)
                if metadata:
                    assert (await call).policy == "kv_aware"
                    continue
                with pytest.raises(aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            router.error = InvalidRequest("sampling.top_p", "must be in (0, 1]")
            with pytest.raises(aio.AioRpcError) as mapped:  # still mapped, from the kept one
                await stub.GetClusterStatus(router_pb2.GetClusterStatusRequest(), timeout=5,
                                            metadata=good)
            assert mapped.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await started.stop(grace=None)
