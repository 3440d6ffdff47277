"""OpenTelemetry tracing for every Tandem process: set-up, spans, W3C context propagation, and
the request id / trace id that go on every log line of a request.

Off unless an OTLP endpoint is configured, through the standard variables only:

| variable                                 | effect                                           |
| ---------------------------------------- | ------------------------------------------------ |
| `OTEL_EXPORTER_OTLP_ENDPOINT`            | turns tracing on; the OTLP/gRPC collector        |
| `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`     | same, traces only (wins over the one above)      |
| `OTEL_SDK_DISABLED=true`                 | forces tracing off                               |
| `OTEL_TRACES_EXPORTER`                   | `otlp` (default); `none` forces tracing off      |
| `OTEL_EXPORTER_OTLP_{,TRACES_}PROTOCOL`  | `grpc` (default); anything else: off, warned     |
| `OTEL_SERVICE_NAME`                      | `service.name`; wins over the process's own name |
| `OTEL_RESOURCE_ATTRIBUTES`               | extra resource attributes (win over the code's)  |
| `OTEL_TRACES_SAMPLER`, `..._ARG`         | sampler (default `parentbased_always_on`)        |
| `OTEL_EXPORTER_OTLP_INSECURE`, ...       | the exporter's own (headers, timeout, TLS files) |
| `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_*`  | batching (default: export every 5 s)             |

The SDK, the OTLP exporter and the batch processor read these variables themselves (this
module decides only on/off and the fallback service name); an `http://` endpoint gets a plaintext
channel, `https://` a TLS one. When off, nothing of the SDK is imported, no provider is
installed, and every helper here returns at once: `span()` yields the API's shared invalid
span without touching the context, `inject_metadata()` returns `[]`, `current_traceparent()`
returns "".

How context travels (W3C Trace Context, `traceparent`):

    gRPC    opentelemetry-instrumentation-grpc's aio interceptors, installed by
            `observability.grpc_tracing` on every server and on the router's channels: a CLIENT
            span per call, a SERVER span per handled call, `traceparent` in the metadata
    KV      sender: agent.write(..., trace_context=traceparent_of(send_span))
            receiver: record_span("kv.receive", parent=event.trace_context, duration_s=...)

Log lines: `RequestLogFilter` (installed by `observability.logging_setup.setup_logging`) adds
`request_id` (from `set_request_id`) and `trace_id` (from the current span) to every record.
Both live in `contextvars`, so they follow a request into the asyncio tasks it creates, but NOT
into threads: lines logged by the engine thread (or from `loop.run_in_executor`) carry "-"
unless the callable is run under `contextvars.copy_context().run` (`asyncio.to_thread` does so).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

log = logging.getLogger(__name__)

TRACER_NAME = "tandem"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
NO_VALUE = "-"  # what a log line shows for a missing request id or trace id

Attributes = Mapping[str, AttributeValue]

_PROPAGATOR = TraceContextTextMapPropagator()


class _State:
    """What `setup_tracing` installed; module-level because a process has one provider."""

    def __init__(self) -> None:
        self.enabled = False
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.provider: Any = None  # the SDK TracerProvider we installed, for shutdown
        self.recording: trace.TracerProvider | None = None  # the provider spans go to when on
        self.lock = threading.Lock()


_state = _State()


# ---- set-up ----------------------------------------------------------------------------------


def tracing_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the `OTEL_*` variables in `environ` (default `os.environ`) ask for OTLP traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return False
    if exporter not in ("", "otlp"):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (only otlp): tracing is off",
                    exporter)
        return False
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol != "grpc":
        log.warning("OTLP protocol %s is not supported (only grpc): tracing is off", protocol)
        return False
    return True


def setup_tracing(service_name: str, *, attributes: Attributes | None = None) -> bool:
    """Installs the SDK tracer provider (batching OTLP/gRPC exporter) if the environment asks
    for traces (see the module docstring); returns whether tracing is on.

    `service_name` is used unless `OTEL_SERVICE_NAME` is set; `attributes` are extra resource
    attributes (e.g. `{"service.instance.id": worker_id}`; `OTEL_RESOURCE_ATTRIBUTES` wins).
    Call once, early in the process (a second call changes nothing). `shutdown_tracing` runs at
    exit by itself (bounded), so spans still batched when the process ends are sent.
    """
    with _state.lock:
        if _state.provider is not None:
            return _state.enabled
        if not tracing_configured():
            return False
        # Imported only when on: the SDK and the exporter cost nothing in a process without them.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        extra: dict[str, AttributeValue] = dict(attributes or {})
        if not os.environ.get("OTEL_SERVICE_NAME"):
            extra[SERVICE_NAME] = service_name
        env_attributes = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        for key in {part.split("=", 1)[0].strip() for part in env_attributes.split(",")}:
            extra.pop(key, None)  # the environment wins over the code, as OTEL_SERVICE_NAME does
        # Resource.create merges the detectors (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME)
        # and then `extra` over them; the sampler comes from OTEL_TRACES_SAMPLER(_ARG).
        provider = TracerProvider(resource=Resource.create(extra), shutdown_on_exit=False)
        from observability.span_names import RpcSpanNames

        provider.add_span_processor(RpcSpanNames())
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _state.provider = _state.recording = provider
        _state.tracer = provider.get_tracer(TRACER_NAME)
        _state.enabled = True
        atexit.register(shutdown_tracing)
        log.info("tracing on: OTLP/gRPC to %s, service %s, sampler %s",
                 os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                 or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
                 provider.resource.attributes.get(SERVICE_NAME),
                 provider.sampler.get_description())
        return True


def shutdown_tracing(timeout_s: float = 5.0) -> None:
    """Sends the spans still batched and stops the exporter, waiting at most `timeout_s` (an
    unreachable collector cannot hold the process). Safe to call more than once, and when off."""
    with _state.lock:
        provider, _state.provider, _state.recording = _state.provider, None, None
        _state.enabled = False
        _state.tracer = trace.NoOpTracer()
    if provider is None:
        return
    # The SDK's own shutdown waits up to 30 s (and an export retries up to the exporter's
    # timeout): run it on a daemon thread and stop waiting at our deadline.
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.warning("tracing: spans not flushed within %.1f s; dropping them", timeout_s)


def tracing_enabled() -> bool:
    """Whether spans are being recorded and exported in this process."""
    return _state.enabled


def tracer() -> trace.Tracer:
    """The process's tracer (a no-op tracer when tracing is off)."""
    return _state.tracer


def recording_provider() -> trace.TracerProvider | None:
    """The provider spans are recorded with (None when tracing is off): what the gRPC
    instrumentation's interceptors must use too."""
    return _state.recording if _state.enabled else None


@contextmanager
def use_tracer_provider(provider: trace.TracerProvider) -> Iterator[None]:
    """Tests: records this module's spans, and the gRPC interceptors' made after entering,
    with `provider` (e.g. an SDK provider with `observability.span_names.RpcSpanNames` and an
    `InMemorySpanExporter`) inside the block, without installing a global provider (which a
    process can do only once)."""
    with _state.lock:
        saved = (_state.enabled, _state.tracer, _state.recording)
        _state.enabled, _state.tracer = True, provider.get_tracer(TRACER_NAME)
        _state.recording = provider
    try:
        yield
    finally:
        with _state.lock:
            _state.enabled, _state.tracer, _state.recording = saved


# ---- spans -----------------------------------------------------------------------------------


class _NoSpan(AbstractContextManager[Span]):
    """What `span` and `server_span` return when tracing is off: one shared object, no work."""

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes | None = None,
         parent: Context | str | None = None) -> AbstractContextManager[Span]:
    """Starts a span, makes it current inside the block, ends it on exit.

    `parent`: a `Context` (e.g. from `context_from_metadata`), a traceparent string, or None for
    the current span. An exception marks the span ERROR and propagates; a cancellation
    (`asyncio.CancelledError`, `GeneratorExit`) sets `tandem.cancelled` and no error. Safe in
    async generators (streaming handlers), including ones closed from another task. Off: yields
    the shared non-recording span and does nothing else.
    """
    if not _state.enabled:
        return _NO_SPAN
    return _span(name, kind, attributes, parent)


@contextmanager
def _span(name: str, kind: SpanKind, attributes: Attributes | None,
          parent: Context | str | None) -> Iterator[Span]:
    if isinstance(parent, str):
        parent = context_from_traceparent(parent)
    current = _state.tracer.start_span(name, context=parent, kind=kind, attributes=attributes,
                                       record_exception=False, set_status_on_exception=False)
    token = otel_context.attach(trace.set_span_in_context(current, parent))
    try:
        yield current
    except (asyncio.CancelledError, GeneratorExit):
        current.set_attribute("tandem.cancelled", True)
        raise
    except BaseException as error:
        current.record_exception(error)
        current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        current.end()
        _detach(token)


def record_span(name: str, *, parent: Context | str | None, duration_s: float,
                end_time_ns: int | None = None, kind: SpanKind = SpanKind.INTERNAL,
                attributes: Attributes | None = None, error: str = "") -> None:
    """Records a span that already happened: it ended at `end_time_ns` (default now, epoch ns)
    and lasted `duration_s`. For work observed only at its end, e.g. the decode side's
    `kv.receive` from a REQUEST_COMPLETE event (`parent=event.trace_context`,
    `duration_s=event.latency_s`). `error` marks the span failed with that description."""
    if not _state.enabled:
        return
    if isinstance(parent, str):
        parent = context_from_traceparent(parent)
    end = time.time_ns() if end_time_ns is None else end_time_ns
    start = end - max(int(duration_s * 1e9), 0)
    done = _state.tracer.start_span(name, context=parent, kind=kind, attributes=attributes,
                                    start_time=start)
    if error:
        done.set_status(Status(StatusCode.ERROR, error))
    done.end(end_time=end)


def annotate(attributes: Attributes) -> None:
    """Sets `attributes` on the current span: in a gRPC handler, the call's SERVER span (made by
    the instrumentation's interceptor). A no-op when tracing is off."""
    if _state.enabled:
        trace.get_current_span().set_attributes(attributes)


def _detach(token: contextvars.Token[Context]) -> None:
    """`otel_context.detach`, but quiet when the token belongs to another `Context`: an async
    generator finalized by the event loop (not by the task that ran it) ends its `with` block in
    a fresh task, where resetting the task's variable is impossible and also unneeded."""
    with suppress(ValueError):
        token.var.reset(token)


# ---- propagation -----------------------------------------------------------------------------


def current_traceparent() -> str:
    """The current span's W3C `traceparent` ("00-<trace id>-<span id>-<flags>"), for opaque
    string carriers such as the KV transfer's `trace_context`; "" when off or no span."""
    if not _state.enabled:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get(TRACEPARENT, "")


def traceparent_of(target: Span) -> str:
    """`target`'s `traceparent`, whether or not it is current (e.g. a send span kept open while
    another span is current); "" for a non-recording, invalid span."""
    if not target.get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(target, Context()))
    return carrier.get(TRACEPARENT, "")


def context_from_traceparent(traceparent: str) -> Context:
    """A context whose parent is the span `traceparent` names; empty (so a new trace starts) if
    the string is empty or malformed."""
    if not traceparent:
        return Context()
    return _PROPAGATOR.extract({TRACEPARENT: traceparent})


def current_trace_id() -> str:
    """The current trace id as 32 hex digits, or "" when there is no valid span."""
    span_context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else ""


# ---- request id and log lines ----------------------------------------------------------------

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("tandem_request_id",
                                                                  default="")


def current_request_id() -> str:
    """The request id bound in this context by `set_request_id`, or ""."""
    return _request_id.get()


def bind_request_id(request_id: str) -> contextvars.Token[str]:
    """Binds `request_id` to the current context; undo with `unbind_request_id(token)`."""
    return _request_id.set(request_id)


def unbind_request_id(token: contextvars.Token[str]) -> None:
    """Undoes `bind_request_id` (quietly a no-op from another context, see `_detach`)."""
    with suppress(ValueError):
        _request_id.reset(token)


@contextmanager
def set_request_id(request_id: str) -> Iterator[None]:
    """Every log line inside the block (and in tasks it creates) carries `request_id`."""
    token = bind_request_id(request_id)
    try:
        yield
    finally:
        unbind_request_id(token)


class RequestLogFilter(logging.Filter):
    """Adds `request_id` and `trace_id` ("-" when absent) to every record it sees, and escapes
    line breaks and other control characters in the message and the request id, so that no
    input (a request id, a prompt echoed in an error) can forge a log line. Install it on
    handlers (a filter on a logger misses records propagated from child loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _escape(_request_id.get()) or NO_VALUE
        record.trace_id = current_trace_id() or NO_VALUE
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = _escape(message), None
        return True


def _escape(text: str) -> str:
    """`text` with control characters written as escapes ("\\n", "\\x1b"), on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


__all__ = [
    "RequestLogFilter",
    "SpanKind",
    "annotate",
    "bind_request_id",
    "context_from_traceparent",
    "current_request_id",
    "current_trace_id",
    "current_traceparent",
    "record_span",
    "recording_provider",
    "set_request_id",
    "setup_tracing",
    "shutdown_tracing",
    "span",
    "traceparent_of",
    "tracer",
    "tracing_configured",
    "tracing_enabled",
    "unbind_request_id",
    "use_tracer_provider",
]
