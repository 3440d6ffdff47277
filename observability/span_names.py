"""Span names as the RPC semantic conventions write them: `tandem.v1.Prefill/Prefill`.

The gRPC instrumentation names a call's spans by its method path, with a leading "/"; this
processor drops the slash when a span starts, so traces read the same whichever side (our own
spans, the instrumentation's, a collector's query) names them. Imported only when tracing is on
(it needs the SDK).
"""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.sdk.trace import Span, SpanProcessor


class RpcSpanNames(SpanProcessor):
    """Renames "/pkg.Service/Method" spans to "pkg.Service/Method" at their start."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if span.name.startswith("/"):
            span.update_name(span.name[1:])
