"""How every Tandem service process runs, from its start to a graceful stop.

    await serve_until_stopped(services, ProcessOptions(name="router", listen=..., ...))

1. the gRPC server starts on `listen` (health SERVING, reflection, error mapping, tracing);
2. `/metrics` starts on `metrics_listen` (unless it is empty);
3. `on_started(address)` runs (a worker registers itself) and the address is logged;
4. it waits for SIGTERM or SIGINT (or for `stop` to be set: a worker whose engine died);
5. health turns NOT_SERVING and `on_stopping()` runs (a worker deregisters, so no new work
   comes); in-flight calls get `grace_s` to finish; then `/metrics` stops.

Readiness is the health service: a process is ready once its server answers SERVING
(`grpc.health.v1`, what Kubernetes probes and `tandem up` ask); nothing scrapes log lines.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from prometheus_client import CollectorRegistry

from cluster.addresses import split_host_port
from cluster.grpc_server import ServiceBinding, start_server
from cluster.tls import TlsConfig
from observability.metrics import serve_metrics

log = logging.getLogger(__name__)


@dataclass
class ProcessOptions:
    """Where one service process listens and how it stops."""

    name: str  # for log lines: "router", "prefill worker prefill-1", ...
    listen: str  # gRPC host:port (port 0: any free port)
    metrics_registry: CollectorRegistry
    metrics_listen: str = ""  # host:port of /metrics; "" turns it off
    advertise_host: str = ""  # the host peers dial (default: the listen host)
    grace_s: float = 10.0  # in-flight calls get this long to finish once stopping
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set it to stop the process
    on_started: Callable[[str], Awaitable[None]] | None = None  # gets the advertised address
    on_stopping: Callable[[], Awaitable[None]] | None = None
    interceptors: Sequence[aio.ServerInterceptor] = ()  # after tracing and error mapping
    grpc_options: Sequence[tuple[str, Any]] = ()  # channel args, after the defaults
    # TLS of the gRPC port and /metrics; the default (nothing chosen) refuses to serve
    tls: TlsConfig = field(default_factory=TlsConfig)
    require_client_cert: bool = False  # mutual TLS: the workers' internal services


async def serve_until_stopped(services: Sequence[ServiceBinding], options: ProcessOptions,
                              ) -> str:
    """Runs the process's servers until a signal or `options.stop` (see the module doc);
    returns the address it served on."""
    options.tls.require_choice()
    server = await start_server(
        services, options.listen, interceptors=options.interceptors,
        options=options.grpc_options,
        credentials=options.tls.server_credentials(options.require_client_cert))
    host = options.advertise_host or server.host
    address = f"{host}:{server.port}"
    metrics = None
    if options.metrics_listen:
        metrics_host, metrics_port = split_host_port(options.metrics_listen, "metrics_listen")
        metrics = serve_metrics(options.metrics_registry, metrics_host, metrics_port,
                                **options.tls.metrics_options())
        log.info("%s: metrics on %s://%s/metrics", options.name, options.tls.scheme,
                 metrics.address)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, options.stop.set)
    try:
        if options.on_started is not None:
            await options.on_started(address)
        log.info("%s serving on %s (%s)", options.name, address,
                 "mutual TLS" if options.tls.enabled and options.require_client_cert
                 else "TLS" if options.tls.enabled else "PLAINTEXT, chosen explicitly")
        await options.stop.wait()
        log.info("%s shutting down: no new work, %.0f s grace", options.name, options.grace_s)
        await server.set_serving(False)
        if options.on_stopping is not None:
            await options.on_stopping()
    finally:
        await server.stop(options.grace_s)
        if metrics is not None:
            metrics.close()
    return address
