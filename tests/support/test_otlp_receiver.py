"""The test OTLP receiver, fed by the real OTLP/gRPC span exporter of the SDK (on a private
provider, so no global state is touched)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.util.types import AttributeValue

from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, ancestors, tree_problems


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


def provider_for(receiver: OtlpReceiver, service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service,
                                                        "service.instance.id": "i-1"}),
                              shutdown_on_exit=False)
    # insecure from the http:// scheme, as with OTEL_EXPORTER_OTLP_ENDPOINT
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
    return provider


def test_spans_arrive_flattened_with_ids_kinds_resource_and_attributes(
        receiver: OtlpReceiver) -> None:
    assert receiver.endpoint == f"http://127.0.0.1:{receiver.port}"
    provider = provider_for(receiver, "svc-a")
    tracer = provider.get_tracer("t")
    attributes: dict[str, AttributeValue] = {
        "s": "x", "i": 7, "f": 0.5, "b": True, "list": ["a", "b"]}
    with tracer.start_as_current_span("root", kind=SpanKind.SERVER, attributes=attributes) \
            as root, tracer.start_as_current_span("child", kind=SpanKind.PRODUCER) as child:
        child.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()
    spans = receiver.wait_for(lambda got: len(got) == 2, timeout=10)
    by_name = {s.name: s for s in spans}
    r, c = by_name["root"], by_name["child"]
    assert r.trace_id == f"{root.get_span_context().trace_id:032x}"
    assert r.span_id == f"{root.get_span_context().span_id:016x}"
    assert c.span_id == f"{child.get_span_context().span_id:016x}"
    assert (r.parent_span_id, c.parent_span_id) == ("", r.span_id)
    assert c.trace_id == r.trace_id
    assert (r.kind, c.kind) == ("SERVER", "PRODUCER")
    assert r.service_name == c.service_name == "svc-a"
    assert r.resource["service.instance.id"] == "i-1"
    assert r.attributes == {"s": "x", "i": 7, "f": 0.5, "b": True, "list": ["a", "b"]}
    assert (c.status, c.status_message, r.status) == ("ERROR", "boom", "UNSET")
    assert r.scope == "t"
    assert r.start_time_ns <= c.start_time_ns <= c.end_time_ns <= r.end_time_ns
    assert receiver.exports == 2


def test_traces_group_by_trace_id_and_sort_by_start(receiver: OtlpReceiver) -> None:
    provider = provider_for(receiver, "svc-b")
    tracer = provider.get_tracer("t")
    for n in range(3):
        root = tracer.start_span(f"root-{n}")
        ctx = set_span_in_context(root)
        tracer.start_span(f"late-{n}", context=ctx).end()  # exported before its parent
        root.end()
    provider.shutdown()
    receiver.wait_for(lambda got: len(got) == 6)
    traces = receiver.traces()
    assert len(traces) == 3
    for spans in traces.values():
        assert [s.name.split("-")[0] for s in spans] == ["root", "late"]
        assert len({s.name.split("-")[1] for s in spans}) == 1
    receiver.clear()
    assert receiver.spans() == []


def test_wait_for_times_out_listing_what_arrived(receiver: OtlpReceiver) -> None:
    provider = provider_for(receiver, "svc-c")
    provider.get_tracer("t").start_span("only").end()
    provider.shutdown()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"got 1 spans: \[\('svc-c', 'only'\)\]"):
        receiver.wait_for(lambda got: len(got) > 1, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3


async def test_wait_for_async_keeps_the_event_loop_running(receiver: OtlpReceiver) -> None:
    provider = provider_for(receiver, "svc-d")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    def export_later() -> None:
        time.sleep(0.2)
        provider.get_tracer("t").start_span("late").end()

    tick_task = asyncio.create_task(ticker())
    export_task = asyncio.create_task(asyncio.to_thread(export_later))
    spans: list[ReceivedSpan] = await receiver.wait_for_async(
        lambda got: any(s.name == "late" for s in got), timeout=10)
    await export_task
    tick_task.cancel()
    provider.shutdown()
    assert [s.name for s in spans] == ["late"]
    assert ticks >= 5  # the loop kept running while we waited


def test_stop_closes_the_port() -> None:
    receiver = OtlpReceiver()
    receiver.stop()
    exporter = OTLPSpanExporter(endpoint=receiver.endpoint, timeout=1)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("t").start_span("lost").end()
    provider.shutdown()
    assert receiver.spans() == []


def test_tree_problems_and_ancestors() -> None:
    def make(span_id: str, parent: str, trace_id: str = "t1") -> ReceivedSpan:
        return ReceivedSpan(trace_id, span_id, parent, f"n{span_id}", "INTERNAL", "svc")

    root, mid, leaf = make("a", ""), make("b", "a"), make("c", "b")
    assert tree_problems([root, mid, leaf]) == []
    assert ancestors([root, mid, leaf], leaf) == [mid, root]
    assert tree_problems([root, leaf]) == ["orphan svc/nc (parent b not exported)"]
    assert tree_problems([root, mid, make("d", "")]) == ["2 roots: [('svc', 'na'), ('svc', 'nd')]"]
    assert tree_problems([root, make("b", "a", "t2")]) == ["2 trace ids"]
    assert tree_problems([root, mid, make("b", "a")]) == ["duplicated span ids"]
