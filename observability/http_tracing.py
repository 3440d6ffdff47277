"""HTTP tracing from the kept library: opentelemetry-instrumentation-fastapi (ASGI underneath).

    instrument_app(app)   # a SERVER span per request, child of the caller's `traceparent`

The span is current while the handler and its streamed body run, so the router's spans
(`router.queue`, `router.route`) and the gRPC client spans of its calls to the workers nest
under it. Per-message spans (`http send` per streamed chunk) are left out, and so are the
probes (`/health`, `/v1/models`). With tracing off nothing is installed.
"""

from __future__ import annotations

from typing import Any

from observability.tracing import recording_provider

UNTRACED_URLS = "/health,/v1/models"


def instrument_app(app: Any) -> None:
    """Traces `app`'s requests with the provider `observability.tracing` records with."""
    provider = recording_provider()
    if provider is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider,
                                       excluded_urls=UNTRACED_URLS,
                                       exclude_spans=["receive", "send"])
