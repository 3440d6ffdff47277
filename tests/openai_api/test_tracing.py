"""The trace of an API request starts at its HTTP server span (opentelemetry-instrumentation-
fastapi), honours the caller's W3C `traceparent`, and holds the router's spans and its gRPC
calls to the workers; spans recorded in memory through an injected provider."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from observability import tracing
from observability.span_names import RpcSpanNames
from tests.openai_api.conftest import Factory

pytestmark = pytest.mark.timeout(60)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "router"}),
                              shutdown_on_exit=False)
    provider.add_span_processor(RpcSpanNames())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with tracing.use_tracer_provider(provider):
        yield memory
    provider.shutdown()


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


@pytest.mark.parametrize("stream", [False, True])
async def test_router_and_worker_call_spans_nest_under_the_http_span(
        make_api: Factory, exporter: InMemorySpanExporter, stream: bool) -> None:
    async with make_api() as api:
        reply = await api.client.chat.completions.create(
            model="llama-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=stream, extra_headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
        if stream:
            async for _chunk in reply:  # type: ignore[union-attr]
                pass
    spans = [s for s in exporter.get_finished_spans() if s.context is not None]
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    by_id = {s.context.span_id: s for s in spans}
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER
                 and s.name == "POST /v1/chat/completions"]
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.attributes is not None
    assert str(server.attributes["tandem.request_id"]).startswith("chatcmpl-")
    nested = {s.name: ancestors(s, by_id) for s in spans if s is not server}
    for name in ("router.queue", "router.route", "tandem.v1.Decode/Reserve",
                 "tandem.v1.Prefill/Prefill", "tandem.v1.Decode/Decode"):
        assert server.name in nested[name], (name, nested)
    assert not [s for s in spans if "http send" in s.name or "http receive" in s.name]
