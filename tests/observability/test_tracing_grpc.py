"""Trace context across a real gRPC hop, through opentelemetry-instrumentation-grpc: a grpc.aio
server built by `cluster.grpc_server` (tracing and error-mapping interceptors) serving a fake
Decode servicer that annotates its SERVER span and opens child spans, and a client channel with
`client_interceptors()`; spans recorded in memory through an injected provider."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_trace_id

from cluster.errors import NoCapacity
from cluster.grpc_server import GrpcServer, ServiceBinding, service_name, start_server
from observability import tracing
from observability.grpc_tracing import client_interceptors
from observability.logging_setup import LOG_FORMAT
from observability.span_names import RpcSpanNames
from tandem_proto.tandem.v1 import decode_pb2, decode_pb2_grpc

DECODE = service_name(decode_pb2.DESCRIPTOR, "Decode")
log = logging.getLogger("tandem.test.fake_decode")


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    """Reserve: unary (NoCapacity for an empty prompt); Decode: a stream of `first_token_id`
    one-token messages (forever when it is 0), with a child span around the stream."""

    def __init__(self) -> None:
        self.stream_started = asyncio.Event()

    async def Reserve(self, request: decode_pb2.ReserveRequest,
                      context: aio.ServicerContext) -> decode_pb2.ReserveResponse:
        tracing.annotate({"tandem.request_id": request.request_id})
        with tracing.set_request_id(request.request_id):
            log.info("reserving %d tokens", len(request.token_ids))
            if not request.token_ids:
                raise NoCapacity("no blocks")
            return decode_pb2.ReserveResponse(block_ids=[1, 2])

    async def Decode(self, request: decode_pb2.DecodeRequest,
                     context: aio.ServicerContext) -> AsyncIterator[decode_pb2.DecodeResponse]:
        if True:  # the interceptor's SERVER span is current
            with tracing.span("decode.admission"):
                await asyncio.sleep(0)
            with tracing.span("decode.stream") as stream:
                self.stream_started.set()
                count = 0
                while request.first_token_id == 0 or count < request.first_token_id:
                    count += 1
                    stream.set_attribute("tandem.tokens", count)
                    yield decode_pb2.DecodeResponse(token_ids=[count])
                    await asyncio.sleep(0.001)
                stream.set_attribute("tandem.finish_reason", "length")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "grpc-hop"}),
                              shutdown_on_exit=False)
    provider.add_span_processor(RpcSpanNames())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing.use_tracer_provider(provider):
        yield memory
    provider.shutdown()


@pytest.fixture
async def served(exporter: InMemorySpanExporter,
                 ) -> AsyncIterator[tuple[FakeDecode, decode_pb2_grpc.DecodeStub]]:
    servicer = FakeDecode()
    server: GrpcServer = await start_server(
        [ServiceBinding(DECODE, decode_pb2_grpc.add_DecodeServicer_to_server, servicer)])
    channel = aio.insecure_channel(server.address, interceptors=client_interceptors())
    yield servicer, decode_pb2_grpc.DecodeStub(channel)
    await channel.close()
    await server.stop(grace=None)


def named(memory: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """Finished spans by name; a gRPC call's CLIENT span is "<method> client"."""
    return {f"{s.name} client" if s.kind is SpanKind.CLIENT and "/" in s.name else s.name: s
            for s in memory.get_finished_spans()}


async def ended(memory: InMemorySpanExporter, *names: str) -> dict[str, ReadableSpan]:
    """`named(memory)` once every span in `names` has ended: the server side ends its span
    after the client already holds the status, so a test reading both waits (5 s at most)."""
    deadline = asyncio.get_running_loop().time() + 5
    while not set(names) <= set(named(memory)):
        assert asyncio.get_running_loop().time() < deadline, f"never ended: {names}"
        await asyncio.sleep(0.01)
    return named(memory)


def stream_end(spans: dict[str, ReadableSpan]) -> int:
    end = spans["decode.stream"].end_time
    assert end is not None
    return end


def ids(span: ReadableSpan) -> tuple[int, int, int | None]:
    """(trace id, span id, parent span id)."""
    assert span.context is not None
    return (span.context.trace_id, span.context.span_id,
            span.parent.span_id if span.parent is not None else None)


async def test_unary_call_server_span_is_child_of_client_span(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub]) -> None:
    _, stub = served
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(tracing.RequestLogFilter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with tracing.span("router.Generate", kind=SpanKind.SERVER):
            await stub.Reserve(decode_pb2.ReserveRequest(request_id="r-1.0", token_ids=[5]))
    finally:
        log.removeHandler(handler)
    spans = await ended(exporter, "router.Generate", "tandem.v1.Decode/Reserve client",
                        "tandem.v1.Decode/Reserve")
    root, client = spans["router.Generate"], spans["tandem.v1.Decode/Reserve client"]
    server = spans["tandem.v1.Decode/Reserve"]
    assert ids(client)[2] == ids(root)[1]
    assert ids(server)[2] == ids(client)[1]
    assert ids(server)[0] == ids(client)[0] == ids(root)[0]
    assert server.kind is SpanKind.SERVER and client.kind is SpanKind.CLIENT
    assert (server.attributes or {})["tandem.request_id"] == "r-1.0"
    assert (server.attributes or {})["rpc.method"] == "Reserve"
    assert f"[req=r-1.0 trace={format_trace_id(ids(root)[0])}]: reserving 1 tokens" \
        in buffer.getvalue()


async def test_a_refused_call_is_an_error_for_the_client_and_keeps_its_status_code(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub]) -> None:
    _, stub = served
    with pytest.raises(aio.AioRpcError) as raised:
        await stub.Reserve(decode_pb2.ReserveRequest(request_id="r-2.0"))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    spans = await ended(exporter, "tandem.v1.Decode/Reserve",
                        "tandem.v1.Decode/Reserve client")
    server, client = spans["tandem.v1.Decode/Reserve"], spans["tandem.v1.Decode/Reserve client"]
    for side in (server, client):
        assert (side.attributes or {})["rpc.grpc.status_code"] == \
            grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    # the RPC conventions: a call that failed is an error for its client; for the server only
    # when the server is at fault (INTERNAL, UNAVAILABLE, ...), not when it refused the request
    assert client.status.status_code is StatusCode.ERROR
    assert "no blocks" in (client.status.description or "")
    assert server.status.status_code is StatusCode.UNSET
    assert ids(server)[2] == ids(client)[1]


async def test_streaming_call_spans_nest_under_the_client(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub]) -> None:
    _, stub = served
    call = stub.Decode(decode_pb2.DecodeRequest(request_id="r-3.0", first_token_id=3))
    tokens = [list(m.token_ids) async for m in call]
    assert tokens == [[1], [2], [3]]
    spans = await ended(exporter, "tandem.v1.Decode/Decode client", "tandem.v1.Decode/Decode",
                        "decode.stream", "decode.admission")
    client, server = spans["tandem.v1.Decode/Decode client"], spans["tandem.v1.Decode/Decode"]
    assert client.end_time is not None and stream_end(spans) <= client.end_time  # read whole
    admission, stream = spans["decode.admission"], spans["decode.stream"]
    assert ids(server)[2] == ids(client)[1]
    assert ids(admission)[2] == ids(server)[1]
    assert ids(stream)[2] == ids(server)[1]
    assert len({ids(s)[0] for s in spans.values()}) == 1
    assert dict(stream.attributes or {}) == {"tandem.tokens": 3,
                                             "tandem.finish_reason": "length"}


async def test_client_cancelling_a_stream_ends_the_server_spans(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub],
        caplog: pytest.LogCaptureFixture) -> None:
    servicer, stub = served
    call = stub.Decode(decode_pb2.DecodeRequest(request_id="r-5.0", first_token_id=0))
    await call.read()
    await servicer.stream_started.wait()
    call.cancel()
    # the client span ends when its response stream does: read on, to the cancellation
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    spans = await ended(exporter, "tandem.v1.Decode/Decode", "tandem.v1.Decode/Decode client",
                        "decode.stream")
    assert (spans["decode.stream"].attributes or {}).get("tandem.cancelled") is True
    assert spans["decode.stream"].status.status_code is StatusCode.UNSET
    assert ids(spans["tandem.v1.Decode/Decode"])[2] == \
        ids(spans["tandem.v1.Decode/Decode client"])[1]
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")
                and r.levelno >= logging.WARNING]


async def test_a_cancelled_write_closes_the_stream_in_the_calls_own_task() -> None:
    """The deterministic half of the test above: grpc cancels a streaming call while its
    handler waits to send. The wrapped handler must close the response generator in that same
    task (so the instrumentation's span context is left where it was entered), not leave it
    for the event loop to finalize in another task."""
    from observability.grpc_tracing import _written

    closed_in: list[asyncio.Task[object] | None] = []

    async def responses(request: object, context: object) -> AsyncGenerator[int, None]:
        try:
            while True:
                yield 1
        finally:
            closed_in.append(asyncio.current_task())

    class CancelledOnWrite:
        async def write(self, message: object) -> None:
            raise asyncio.CancelledError

    call = asyncio.ensure_future(_written(responses)(None, CancelledOnWrite()))
    with pytest.raises(asyncio.CancelledError):
        await call
    assert closed_in == [call]
