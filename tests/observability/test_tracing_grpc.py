"""Trace context across a real gRPC hop: a grpc.aio server built by `cluster.grpc_server` (with
the error-mapping interceptor) serving a fake Decode servicer that uses `server_span`, and a
client that sends `inject_metadata()`; spans recorded in memory through an injected provider."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator

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
from observability.logging_setup import LOG_FORMAT
from tandem_proto.tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc

DECODE = service_name(decode_pb2.DESCRIPTOR, "Decode")
log = logging.getLogger("tandem.test.fake_decode")


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    """Reserve: unary (NoCapacity for an empty prompt); Decode: a stream of `first_token_id`
    one-token messages (forever when it is 0), with a child span around the stream."""

    def __init__(self) -> None:
        self.stream_started = asyncio.Event()

    async def Reserve(self, request: decode_pb2.ReserveRequest,
                      context: aio.ServicerContext) -> decode_pb2.ReserveResponse:
        with tracing.set_request_id(request.request_id), \
                tracing.server_span("tandem.v1.Decode/Reserve", context,
                                    attributes={"tandem.request_id": request.request_id}):
            log.info("reserving %d tokens", len(request.token_ids))
            if not request.token_ids:
                raise NoCapacity("no blocks")
            return decode_pb2.ReserveResponse(block_ids=[1, 2])

    async def Decode(self, request: decode_pb2.DecodeRequest,
                     context: aio.ServicerContext) -> AsyncIterator[decode_pb2.DecodeResponse]:
        with tracing.server_span("tandem.v1.Decode/Decode", context,
                                 traceparent=request.trace.traceparent):
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
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing.use_tracer_provider(provider):
        yield memory
    provider.shutdown()


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeDecode, decode_pb2_grpc.DecodeStub]]:
    servicer = FakeDecode()
    server: GrpcServer = await start_server(
        [ServiceBinding(DECODE, decode_pb2_grpc.add_DecodeServicer_to_server, servicer)])
    channel = aio.insecure_channel(server.address)
    yield servicer, decode_pb2_grpc.DecodeStub(channel)
    await channel.close()
    await server.stop(grace=None)


def named(memory: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in memory.get_finished_spans()}


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
        with tracing.span("router.Generate", kind=SpanKind.SERVER), \
                tracing.span("tandem.v1.Decode/Reserve client", kind=SpanKind.CLIENT):
            await stub.Reserve(decode_pb2.ReserveRequest(request_id="r-1.0", token_ids=[5]),
                               metadata=tracing.inject_metadata())
    finally:
        log.removeHandler(handler)
    spans = named(exporter)
    root, client = spans["router.Generate"], spans["tandem.v1.Decode/Reserve client"]
    server = spans["tandem.v1.Decode/Reserve"]
    assert ids(client)[2] == ids(root)[1]
    assert ids(server)[2] == ids(client)[1]
    assert ids(server)[0] == ids(client)[0] == ids(root)[0]
    assert server.kind is SpanKind.SERVER
    assert (server.attributes or {})["tandem.request_id"] == "r-1.0"
    assert f"[req=r-1.0 trace={format_trace_id(ids(root)[0])}]: reserving 1 tokens" \
        in buffer.getvalue()


async def test_server_error_marks_the_server_span_and_keeps_the_status_code(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub]) -> None:
    _, stub = served
    with tracing.span("client", kind=SpanKind.CLIENT), \
            pytest.raises(aio.AioRpcError) as raised:
        await stub.Reserve(decode_pb2.ReserveRequest(request_id="r-2.0"),
                           metadata=tracing.inject_metadata())
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    server = named(exporter)["tandem.v1.Decode/Reserve"]
    assert server.status.status_code is StatusCode.ERROR
    assert "NoCapacity" in (server.status.description or "")
    assert ids(server)[2] == ids(named(exporter)["client"])[1]


async def test_streaming_call_spans_nest_under_the_client(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub]) -> None:
    _, stub = served
    with tracing.span("client", kind=SpanKind.CLIENT):
        call = stub.Decode(decode_pb2.DecodeRequest(request_id="r-3.0", first_token_id=3),
                           metadata=tracing.inject_metadata())
        tokens = [list(m.token_ids) async for m in call]
    assert tokens == [[1], [2], [3]]
    spans = named(exporter)
    client, server = spans["client"], spans["tandem.v1.Decode/Decode"]
    admission, stream = spans["decode.admission"], spans["decode.stream"]
    assert ids(server)[2] == ids(client)[1]
    assert ids(admission)[2] == ids(server)[1]
    assert ids(stream)[2] == ids(server)[1]
    assert len({ids(s)[0] for s in spans.values()}) == 1
    assert dict(stream.attributes or {}) == {"tandem.tokens": 3,
                                             "tandem.finish_reason": "length"}


async def test_message_traceparent_is_the_fallback_when_metadata_has_none(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub]) -> None:
    _, stub = served
    with tracing.span("client", kind=SpanKind.CLIENT):
        trace_field = common_pb2.TraceContext(traceparent=tracing.current_traceparent())
        call = stub.Decode(decode_pb2.DecodeRequest(request_id="r-4.0", first_token_id=1,
                                                    trace=trace_field))
        assert len([m async for m in call]) == 1
    spans = named(exporter)
    assert ids(spans["tandem.v1.Decode/Decode"])[2] == ids(spans["client"])[1]


async def test_client_cancelling_a_stream_ends_the_server_spans(
        exporter: InMemorySpanExporter,
        served: tuple[FakeDecode, decode_pb2_grpc.DecodeStub],
        caplog: pytest.LogCaptureFixture) -> None:
    servicer, stub = served
    with tracing.span("client", kind=SpanKind.CLIENT):
        call = stub.Decode(decode_pb2.DecodeRequest(request_id="r-5.0", first_token_id=0),
                           metadata=tracing.inject_metadata())
        await call.read()
        await servicer.stream_started.wait()
        call.cancel()
    deadline = asyncio.get_running_loop().time() + 5
    while "tandem.v1.Decode/Decode" not in named(exporter):
        assert asyncio.get_running_loop().time() < deadline, "server span never ended"
        await asyncio.sleep(0.01)
    spans = named(exporter)
    for name in ("decode.stream", "tandem.v1.Decode/Decode"):
        assert (spans[name].attributes or {}).get("tandem.cancelled") is True
        assert spans[name].status.status_code is StatusCode.UNSET
    assert ids(spans["tandem.v1.Decode/Decode"])[2] == ids(spans["client"])[1]
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")
                and r.levelno >= logging.WARNING]
