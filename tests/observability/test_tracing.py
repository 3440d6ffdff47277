"""Unit tests of `observability.tracing`: spans recorded in memory through an injected provider (the
global one can be installed only once per process, so no test here installs it)."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from observability import tracing
from observability.logging_setup import LOG_FORMAT

# flags: sampled (01), plus "random trace id" (02) from W3C Trace Context level 2
TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[13]$")
OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
             "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME",
             "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "unit"}),
                              shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing.use_tracer_provider(provider):
        yield memory
    provider.shutdown()


def by_name(memory: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in memory.get_finished_spans()}


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


# ---- configuration and the off state ---------------------------------------------------------


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "false"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "zipkin"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, True),
    ({"OTEL_TRACES_SAMPLER": "always_on"}, False),  # a sampler alone does not turn it on
])
def test_tracing_configured_reads_the_standard_variables(env: dict[str, str], on: bool) -> None:
    assert tracing.tracing_configured(env) is on


def test_off_by_default_records_nothing_and_touches_no_context(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    assert tracing.setup_tracing("unit-off") is False
    assert not tracing.tracing_enabled()
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # nothing installed

    before = otel_context.get_current()
    with tracing.span("a", attributes={"k": 1}) as a:
        assert a is trace.INVALID_SPAN
        assert not a.is_recording()
        assert otel_context.get_current() is before  # no attach, no new context
        tracing.annotate({"k": 2})  # no-op, no error
        assert tracing.current_traceparent() == ""
        assert tracing.current_trace_id() == ""
    tracing.record_span("r", parent="", duration_s=0.1)  # no-op, no error
    assert tracing.traceparent_of(a) == ""


# ---- propagation -----------------------------------------------------------------------------


def test_traceparent_string_hop_and_record_span(exporter: InMemorySpanExporter) -> None:
    with tracing.span("prefill.Prefill", kind=SpanKind.SERVER) as root:
        # the send span is kept open while another span is current (the compute span)
        send = tracing.tracer().start_span("kv.send", kind=SpanKind.PRODUCER)
        with tracing.span("prefill.compute"):
            carried = tracing.traceparent_of(send)
            assert tracing.current_traceparent() != carried  # current is the compute span
        send.end()
        assert tracing.current_traceparent() == tracing.traceparent_of(root)
    assert TRACEPARENT_RE.match(carried)
    tracing.record_span("kv.receive", parent=carried, duration_s=0.25,
                        end_time_ns=10_000_000_000, kind=SpanKind.CONSUMER,
                        attributes={"tandem.kv.bytes": 4096}, error="")
    with tracing.span("decode.admission", parent=tracing.context_from_traceparent(carried)):
        pass
    spans = by_name(exporter)
    receive = spans["kv.receive"]
    assert parent_id(receive) == span_id(spans["kv.send"])
    assert parent_id(spans["decode.admission"]) == span_id(spans["kv.send"])
    assert parent_id(spans["kv.send"]) == span_id(spans["prefill.Prefill"])
    assert parent_id(spans["prefill.compute"]) == span_id(spans["prefill.Prefill"])
    assert len({trace_id(s) for s in spans.values()}) == 1
    assert receive.kind is SpanKind.CONSUMER
    assert (receive.start_time, receive.end_time) == (9_750_000_000, 10_000_000_000)
    assert receive.attributes is not None and receive.attributes["tandem.kv.bytes"] == 4096


@pytest.mark.parametrize("bad", ["", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
                                 "00-abc-def-01"])
def test_a_missing_or_malformed_traceparent_starts_a_new_trace(
        exporter: InMemorySpanExporter, bad: str) -> None:
    with tracing.span("first"):
        pass
    with tracing.span("second", parent=bad):
        pass
    spans = by_name(exporter)
    assert parent_id(spans["second"]) is None
    assert trace_id(spans["second"]) != trace_id(spans["first"])


def test_annotate_sets_attributes_on_the_current_span(exporter: InMemorySpanExporter) -> None:
    with tracing.span("tandem.v1.Router/Generate", kind=SpanKind.SERVER):
        tracing.annotate({"tandem.request_id": "r1"})
    server = by_name(exporter)["tandem.v1.Router/Generate"]
    assert dict(server.attributes or {}) == {"tandem.request_id": "r1"}


# ---- errors and cancellation -----------------------------------------------------------------


def test_an_exception_marks_the_span_failed(exporter: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError, match="max_tokens"), tracing.span("bad"):
        raise ValueError("max_tokens: must be >= 1")
    bad = by_name(exporter)["bad"]
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.status.description == "ValueError: max_tokens: must be >= 1"
    assert [e.name for e in bad.events] == ["exception"]


async def test_cancellation_is_not_an_error(exporter: InMemorySpanExporter) -> None:
    started = asyncio.Event()

    async def handler() -> None:
        with tracing.span("stream"):
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(handler())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stream = by_name(exporter)["stream"]
    assert stream.status.status_code is StatusCode.UNSET
    assert (stream.attributes or {}).get("tandem.cancelled") is True


async def test_async_generator_closed_from_another_task_ends_quietly(
        exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture) -> None:
    async def tokens() -> AsyncIterator[int]:
        with tracing.span("decode.stream"):
            for i in range(100):
                yield i

    stream = tokens()
    assert await stream.__anext__() == 0
    # What the event loop's async-generator finalizer does: aclose() in a fresh task.
    with caplog.at_level(logging.DEBUG):
        await asyncio.create_task(stream.aclose())  # type: ignore[attr-defined]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    closed = by_name(exporter)["decode.stream"]
    assert closed.end_time is not None
    assert (closed.attributes or {}).get("tandem.cancelled") is True


# ---- log lines -------------------------------------------------------------------------------


@pytest.fixture
def log_text() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(tracing.RequestLogFilter())
    logger = logging.getLogger("tandem.test.tracing")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, buffer
    logger.removeHandler(handler)


async def test_log_lines_carry_request_and_trace_ids_into_tasks(
        exporter: InMemorySpanExporter, log_text: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = log_text

    async def in_a_task() -> None:
        logger.info("in a task")

    def in_a_plain_thread() -> None:
        logger.info("in the engine thread")

    logger.info("before")
    with tracing.set_request_id("req-42.0"), tracing.span("decode.Decode") as s:
        tid = trace.format_trace_id(s.get_span_context().trace_id)
        logger.info("in the handler")
        await asyncio.create_task(in_a_task())
        await asyncio.to_thread(logger.info, "in to_thread")
        thread = threading.Thread(target=in_a_plain_thread)
        thread.start()
        thread.join()
    logger.info("after")
    lines = dict(line.rsplit(": ", 1)[::-1] for line in buffer.getvalue().splitlines())
    inside = f"[req=req-42.0 trace={tid}]"
    assert inside in lines["in the handler"]
    assert inside in lines["in a task"]
    assert inside in lines["in to_thread"]
    # threads that did not inherit the context (the engine thread) carry no ids: documented
    assert "[req=- trace=-]" in lines["in the engine thread"]
    assert "[req=- trace=-]" in lines["before"]
    assert "[req=- trace=-]" in lines["after"]


def test_request_id_without_tracing_and_nested_binding(
        log_text: tuple[logging.Logger, io.StringIO]) -> None:
    logger, buffer = log_text
    with tracing.set_request_id("outer"):
        token = tracing.bind_request_id("outer.1")
        logger.info("attempt")
        tracing.unbind_request_id(token)
        assert tracing.current_request_id() == "outer"
        logger.info("request")
    assert tracing.current_request_id() == ""
    text = buffer.getvalue()
    assert "[req=outer.1 trace=-]: attempt" in text
    assert "[req=outer trace=-]: request" in text


def test_log_lines_cannot_be_forged_through_request_ids_or_messages() -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(tracing.RequestLogFilter())
    logger = logging.getLogger("tandem.test.forgery")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    forged = "x\n2026-12-01 00:00:00,000 CRITICAL fake [req=- trace=-]: owned"
    try:
        with tracing.set_request_id(forged):
            logger.info("request %s failed", forged)
    finally:
        logger.removeHandler(handler)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 1
    assert "CRITICAL" not in lines[0].split(":")[0]
    assert "[req=x\\n2026-12-01" in lines[0] and "failed" in lines[0]
