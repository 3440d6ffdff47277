"""An OTLP/gRPC trace receiver for tests: what a collector would get, kept in memory.

    with OtlpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint   # "http://127.0.0.1:PORT"
        ... run processes that export spans ...
        receiver.wait_for(lambda spans: len(spans) >= 3, timeout=10)
        for trace_id, spans in receiver.traces().items(): ...

It is a synchronous `grpc.server` on its own thread pool, so it keeps answering whether or not
the test's thread runs (or blocks) an asyncio event loop; `wait_for_async` polls without
blocking a loop. Spans are flattened into `ReceivedSpan`s: ids in hex, the kind's short name
("SERVER"), the resource's `service.name`, attributes as plain Python values.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

Predicate = Callable[[list["ReceivedSpan"]], bool]


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span. `parent_span_id` is "" for a root span."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str  # "INTERNAL" | "SERVER" | "CLIENT" | "PRODUCER" | "CONSUMER" | "UNSPECIFIED"
    service_name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    start_time_ns: int = 0
    end_time_ns: int = 0
    status: str = "UNSET"  # "UNSET" | "OK" | "ERROR"
    status_message: str = ""
    scope: str = ""  # instrumentation scope name


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP `AnyValue` as a plain Python value (lists for arrays, dicts for key/value lists)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


def _short_name(enum_name: str, prefix: str) -> str:
    return enum_name[len(prefix):] if enum_name.startswith(prefix) else enum_name


def flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of an export request, with its resource's attributes."""
    out: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), name=s.name,
                    kind=_short_name(trace_pb2.Span.SpanKind.Name(s.kind), "SPAN_KIND_"),
                    service_name=service, attributes=_attributes(s.attributes),
                    resource=resource, start_time_ns=s.start_time_unix_nano,
                    end_time_ns=s.end_time_unix_nano,
                    status=_short_name(trace_pb2.Status.StatusCode.Name(s.status.code),
                                       "STATUS_CODE_"),
                    status_message=s.status.message, scope=scope_spans.scope.name))
    return out


def tree_problems(spans: list[ReceivedSpan]) -> list[str]:
    """What is wrong with `spans` as one trace (empty when nothing is): more than one trace id,
    not exactly one root, a parent id not among the spans (an orphan: a hop lost its context
    or the parent's process never exported it), a duplicated span id."""
    problems: list[str] = []
    trace_ids = {s.trace_id for s in spans}
    if len(trace_ids) != 1:
        problems.append(f"{len(trace_ids)} trace ids")
    ids = [s.span_id for s in spans]
    if len(set(ids)) != len(ids):
        problems.append("duplicated span ids")
    roots = [s for s in spans if not s.parent_span_id]
    if len(roots) != 1:
        problems.append(f"{len(roots)} roots: {[(r.service_name, r.name) for r in roots]}")
    known = set(ids)
    problems += [f"orphan {s.service_name}/{s.name} (parent {s.parent_span_id} not exported)"
                 for s in spans if s.parent_span_id and s.parent_span_id not in known]
    return problems


def ancestors(spans: list[ReceivedSpan], span: ReceivedSpan) -> list[ReceivedSpan]:
    """`span`'s parent, grandparent, ... up to the root (or the first missing parent)."""
    by_id = {s.span_id: s for s in spans}
    chain: list[ReceivedSpan] = []
    current = by_id.get(span.parent_span_id)
    while current is not None and current not in chain:
        chain.append(current)
        current = by_id.get(current.parent_span_id)
    return chain


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self.sink = sink

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.sink._add(flatten(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Listens on a free loopback port from construction until `stop()` (or the `with` end)."""

    def __init__(self, host: str = "127.0.0.1", max_workers: int = 4) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.exports = 0  # export calls received
        self._server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="otlp-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self),
                                                                  self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        if self.port == 0:
            raise OSError(f"OTLP receiver: cannot bind {host}:0")
        self.host = host
        self._server.start()

    @property
    def endpoint(self) -> str:
        """The value for `OTEL_EXPORTER_OTLP_ENDPOINT` (plaintext gRPC)."""
        return f"http://{self.host}:{self.port}"

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._changed:
            return list(self._spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans grouped by trace id (hex), each list sorted by start time."""
        grouped: dict[str, list[ReceivedSpan]] = {}
        for s in self.spans():
            grouped.setdefault(s.trace_id, []).append(s)
        for spans in grouped.values():
            spans.sort(key=lambda s: s.start_time_ns)
        return grouped

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(self, predicate: Predicate, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Blocks until `predicate(spans)` is true and returns the spans; `TimeoutError`
        (listing what did arrive) after `timeout` s. Do not call it on a running event loop's
        thread while that loop must export spans: use `wait_for_async` there."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(self._timeout_message(timeout))
                self._changed.wait(left)
            return list(self._spans)

    async def wait_for_async(self, predicate: Predicate, timeout: float = 10.0,
                             poll_s: float = 0.02) -> list[ReceivedSpan]:
        """`wait_for` without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while not predicate(spans := self.spans()):
            if time.monotonic() > deadline:
                raise TimeoutError(self._timeout_message(timeout))
            await asyncio.sleep(poll_s)
        return spans

    def _timeout_message(self, timeout: float) -> str:
        names = [(s.service_name, s.name) for s in self._spans]
        return f"OTLP receiver: condition not met after {timeout} s; got {len(names)} spans: " \
               f"{names[:40]}"

    def stop(self, grace: float | None = 0.5) -> None:
        self._server.stop(grace).wait()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


__all__ = ["OtlpReceiver", "ReceivedSpan", "ancestors", "any_value", "flatten", "tree_problems"]
